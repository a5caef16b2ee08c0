"""Attention -> fusedops::attention (GQA-native: k/v taken from before HF's repeat_kv).

  SDPA:  F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=bool|None,
                                        is_causal=..., scale=..., enable_gqa=...)
  eager: matmul(dropout(softmax(matmul(q, k^T) * scale [+ mask], -1, fp32).to(q.dtype)), v), where
         the additive mask is where(bool_mask, 0, min) built in the graph (the bool mask is used).

Float masks become boolean ones where the graph proves it exact (masks.py).
When k/v are a static cache written in this graph at positions `pos` (index_copy_ or
rope_cache_write) and a boolean mask hides the unwritten tail, kv_len = pos[-1:] + 1 is passed so
that decode reads only the filled part of the cache (HF's StaticCache counter itself, once advanced,
when the graph shows it equals that). Prefill attention with a boolean mask also gets
the mask's block map (one per mask node, masks.mask_blocks), so that HF's StaticCache mask runs at
causal speed with no assumption about its values.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ...ops.attention import DECODE_MAX_QUERIES, cuda_unsupported
from .base import Context
from .masks import bool_mask, mask_blocks
from .nodes import (arg, binary_operands, dtype, float_const, is_cast, is_view, kind, last_dim, same, shape, val,
                    written_nodes)

OPS = torch.ops.fusedops



def strip_repeat_kv(node) -> Any:
    """kv from HF repeat_kv: kv[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h*rep, s, d)."""
    if kind(node) != "view" or kind(node.args[0]) != "expand":
        return node
    sliced = node.args[0].args[0]
    if kind(sliced) != "getitem" or not isinstance(sliced.args[1], tuple):
        return node
    index = sliced.args[1]
    full = slice(None, None, None)
    if len(index) == 5 and index[2] is None and all(i == full for i in index[:2] + index[3:]):
        return sliced.args[0]
    return node


def _cache_positions(ctx: Context) -> dict:
    """cache node -> the positions it is written at in this graph."""
    written = {}
    for node in ctx.graph.nodes:
        if kind(node) == "index_copy_":
            written[node.args[0]] = arg(node, 2, "index")
        elif node.target is OPS.rope_cache_write.default:
            written[node.args[5]] = written[node.args[6]] = node.args[7]
    return written


_ARANGE_KWARGS = frozenset({"device", "dtype", "layout", "pin_memory", "requires_grad"})


def _advanced_counter(pos, attention) -> Any:
    """HF's StaticCache layer: pos = arange(n) + counter, then counter.add_(n), both before attention.
    The advanced counter is then pos[-1] + 1, so attention can read it (a view) instead of a new
    pos[-1:] + 1: one small kernel a layer fewer in a decode step. The add_ node, or None when the graph
    is not exactly that (another write to the counter or to a view of it before attention, another
    step, a start offset, another device)."""
    if kind(pos) != "add" or not binary_operands(pos):
        return None
    ranges = [a for a in pos.args if isinstance(a, Node) and a.op == "call_function" and a.target is torch.arange]
    if len(ranges) != 1 or len(ranges[0].args) != 1 or not set(ranges[0].kwargs) <= _ARANGE_KWARGS:
        return None                                   # arange(n) alone: 0 .. n-1
    rng = ranges[0]
    counter = pos.args[1] if pos.args[0] is rng else pos.args[0]
    if (not isinstance(counter, Node) or dtype(counter) not in (torch.int32, torch.int64)
            or shape(counter) not in ((), (1,)) or val(pos) is None or val(counter).device != val(pos).device):
        return None
    advance, aliases, after_pos = None, {counter}, False
    for node in pos.graph.nodes:
        if node is attention:
            break
        if node.args and isinstance(node.args[0], Node) and node.args[0] in aliases and is_view(node):
            aliases.add(node)
        elif after_pos and aliases.intersection(written_nodes(node)):
            if advance is not None or node.op != "call_method" or node.target != "add_" or node.kwargs \
                    or node.args[0] is not counter or len(node.args) != 2 or not same(node.args[1], rng.args[0]):
                return None                           # a second write, or not counter.add_(n)
            advance = node
        after_pos = after_pos or node is pos
    if advance is None or advance.users:
        return None
    return advance


class AttentionPattern:
    names = ("attention",)

    def apply(self, ctx: Context) -> None:
        positions = _cache_positions(ctx)
        for node in list(ctx.graph.nodes):
            if kind(node) == "sdpa":
                self._sdpa(ctx, node, positions)
            elif kind(node) == "matmul":
                self._eager(ctx, node, positions)

    def _sdpa(self, ctx: Context, node, positions) -> None:
        q, k, v = node.args[:3]
        mask = arg(node, 3, "attn_mask")
        if float_const(arg(node, 4, "dropout_p", 0.0)) != 0.0:
            ctx.report.near_miss("attention", node, "dropout_p is not 0")
            return
        if mask is not None and dtype(mask) != torch.bool:
            float_mask, mask = mask, bool_mask(ctx, mask, node)
            if mask is None:
                ctx.report.near_miss("attention", node, f"{dtype(float_mask)} attn_mask whose values are not "
                                                        f"provably 0 / masked (not built in this graph)")
                return
        self._emit(ctx, node, q, k, v, mask, arg(node, 6, "scale"), bool(arg(node, 5, "is_causal", False)),
                   positions, "sdpa", [])

    def _eager(self, ctx: Context, node, positions) -> None:
        """node = matmul(probs, v); walk back to matmul(q, k^T)."""
        probs, v = node.args[0], node.args[1]
        walked = [probs]
        if kind(probs) == "dropout":
            if float_const(arg(probs, 1, "p", 0.5)) != 0.0 and arg(probs, 2, "training", True):
                return
            probs = probs.args[0]
        walked.append(probs)
        if is_cast(probs):
            probs = probs.args[0]
        walked.append(probs)
        if kind(probs) != "softmax":
            return
        if not last_dim(arg(probs, 1, "dim"), len(shape(probs) or ())):
            ctx.report.near_miss("attention", node, "softmax is not over the last dim")
            return
        scores, mask = probs.args[0], None
        walked.append(scores)
        if kind(scores) == "add" and binary_operands(scores):
            a, b = scores.args
            scores, additive = (a, b) if kind(a) in ("mul", "div", "matmul") else (b, a)
            walked.append(scores)
            mask = bool_mask(ctx, additive, node)
            if mask is None:
                ctx.report.near_miss("attention", node, "additive float mask not built from a boolean mask "
                                                        "in this graph")
                return
        scale = 1.0
        if kind(scores) in ("mul", "div") and binary_operands(scores):
            c = float_const(scores.args[1])
            if c is None or c == 0:
                ctx.report.near_miss("attention", node, "scores scaled by a non-constant")
                return
            scale, scores = (c if kind(scores) == "mul" else 1.0 / c), scores.args[0]
        walked.append(scores)
        if kind(scores) != "matmul":
            return
        q, kt = scores.args
        if kind(kt) != "transpose" or sorted(d % 4 for d in kt.args[1:3]) != [2, 3]:
            ctx.report.near_miss("attention", node, "keys are not transposed as k.transpose(-2, -1)")
            return
        self._emit(ctx, node, q, kt.args[0], v, mask, scale, False, positions, "eager", walked + [kt])

    def _emit(self, ctx: Context, node, q, k, v, mask, scale, is_causal, positions, form, walked) -> None:
        repeated = [k, v]
        k, v = strip_repeat_kv(k), strip_repeat_kv(v)
        for r in repeated:  # reshape <- expand <- getitem of repeat_kv, dead once k/v are taken before it
            while r is not k and r is not v and kind(r) in ("view", "expand", "getitem"):
                walked.append(r)
                r = r.args[0]
        qs, ks = shape(q), shape(k)
        if qs is None or ks is None or len(qs) != 4 or len(ks) != 4 or shape(v) != ks:
            ctx.report.near_miss("attention", node, f"q {qs}, k {ks}, v {shape(v)} are not [B, H, S, D]")
            return
        if not isinstance(qs[1], int) or not isinstance(ks[1], int) or qs[1] % ks[1]:
            ctx.report.near_miss("attention", node, f"{ks[1]} kv heads do not divide {qs[1]} q heads")
            return
        if dtype(k) != dtype(q) or dtype(v) != dtype(q):
            ctx.report.near_miss("attention", node, "q/k/v dtypes differ")
            return
        unsupported = cuda_unsupported(val(q), val(k)) if val(q).device.type == "cuda" else None
        if unsupported:  # e.g. an fp32 model or head_dim 80: keep SDPA, which has kernels for them
            ctx.report.near_miss("attention", node, unsupported)
            return
        if is_causal and not same(qs[2], ks[2]):
            ctx.report.near_miss("attention", node, "is_causal with q_len != kv_len (SDPA aligns top-left)")
            return
        kv_len = None
        pos = positions.get(k)
        if pos is not None and positions.get(v) is pos and mask is not None and not is_causal:
            advance = _advanced_counter(pos, node)
            if advance is not None:
                kv_len = ctx.call(torch.reshape, (advance, (1,)), node)
            else:
                last = ctx.call(operator.getitem, (pos, slice(-1, None, None)), node)
                kv_len = ctx.call(operator.add, (last, 1), node)
        blocks = None
        if mask is not None and not (isinstance(qs[2], int) and qs[2] <= DECODE_MAX_QUERIES):  # decode: unused
            blocks = mask_blocks(ctx, mask, node)
        fused = ctx.call(OPS.attention.default, (q, k, v, mask, scale, is_causal, kv_len, blocks), node,
                         like=val(node))
        ctx.replace(node, fused, walked)
        ctx.report.matched("attention", f"{form} {node.name}: q {list(qs)} over kv {list(ks)}"
                                        + (", kv_len from cache positions" if kv_len is not None else ""))
