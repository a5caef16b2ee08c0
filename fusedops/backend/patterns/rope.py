"""RoPE: q*cos + rotate_half(q)*sin for q and k -> fusedops::rope; when the rotated k and the raw v
are then written into a StaticCache (k_cache.index_copy_(2, pos, k); v_cache.index_copy_(2, pos, v))
-> fusedops::rope_cache_write (attention then reads the caches, as before).

rotate_half(x) = cat((-x[..., D/2:], x[..., :D/2]), dim=-1); cos/sin arrive as cos.unsqueeze(1).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

import torch

from ...ops._launch import FLOAT_DTYPES
from .base import Context
from .nodes import arg, binary_operands, dtype, is_cast, kind, last_dim, only_user, same, shape, val

OPS = torch.ops.fusedops


@dataclasses.dataclass
class RopeMatch:
    x: Any
    cos: Any
    sin: Any
    out: Any
    nodes: list


def _half_slice(node, x, first: bool) -> bool:
    """node is x[..., :D/2] (first) or x[..., D/2:] (second)."""
    if kind(node) != "getitem" or node.args[0] is not x or shape(x) is None:
        return False
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if not index or not isinstance(index[-1], slice):
        return False
    lead = index[:-1]
    full = slice(None, None, None)
    if not all(i is Ellipsis or i == full for i in lead) or (Ellipsis not in lead and len(index) != len(shape(x))):
        return False
    s, d = index[-1], shape(x)[-1]
    half = d // 2
    if s.step not in (None, 1):
        return False
    if first:
        return s.start in (None, 0) and same(s.stop, half)
    return same(s.start, half) and (s.stop is None or (isinstance(s.stop, int) and s.stop >= d))


def rotate_half_source(node) -> Optional[Any]:
    if kind(node) != "cat" or not last_dim(arg(node, 1, "dim", 0), len(shape(node) or ())):
        return None
    parts = node.args[0]
    if len(parts) != 2 or kind(parts[0]) != "neg":
        return None
    second, first = parts[0].args[0], parts[1]
    x = first.args[0] if kind(first) == "getitem" else None
    if x is None or not _half_slice(first, x, True) or not _half_slice(second, x, False):
        return None
    return x


def _unsqueezed_1(node) -> Optional[Any]:
    if kind(node) == "unsqueeze" and arg(node, 1, "dim") == 1:
        return node.args[0]
    return None


def match_rope(add) -> Optional[RopeMatch]:
    if binary_operands(add) is None or not all(kind(a) == "mul" and binary_operands(a) for a in add.args):
        return None
    for m_cos, m_sin in (add.args, add.args[::-1]):
        for rot, s in (m_sin.args, m_sin.args[::-1]):
            x = rotate_half_source(rot)
            if x is None or x not in m_cos.args:
                continue
            c = m_cos.args[1] if m_cos.args[0] is x else m_cos.args[0]
            cos, sin = _unsqueezed_1(c), _unsqueezed_1(s)
            if cos is None or sin is None:
                return None
            nodes = [m_cos, m_sin, rot, rot.args[0][0], rot.args[0][0].args[0], rot.args[0][1], c, s]
            return RopeMatch(x, cos, sin, add, nodes)
    return None


def _cos_sin(q: RopeMatch) -> tuple[Any, Any]:
    """HF computes cos/sin in fp32 and casts them to q's dtype; the kernel reads the fp32 sources
    instead (one rounding fewer, as Inductor's fused RoPE does)."""
    def source(node):
        if is_cast(node) and dtype(node) in (torch.bfloat16, torch.float16) and dtype(node.args[0]) == torch.float32:
            return node.args[0]
        return None
    cos, sin = source(q.cos), source(q.sin)
    return (cos, sin) if cos is not None and sin is not None else (q.cos, q.sin)


def _problem(q: RopeMatch, k: RopeMatch) -> Optional[str]:
    dt = dtype(q.x)
    if dt not in FLOAT_DTYPES:
        return f"dtype {dt} has no kernel"
    for name, node in (("k", k.x), ("cos", q.cos), ("sin", q.sin)):
        if dtype(node) != dt:
            return f"{name} dtype {dtype(node)} differs from q's {dt} (an extra cast)"
    qs, ks, cs = shape(q.x), shape(k.x), shape(q.cos)
    if len(qs) != 4 or len(ks) != 4 or len(cs) != 3:
        return f"q {qs} / k {ks} / cos {cs} are not [B, H, S, D] / [B, S, D]"
    if not (same(qs[0], ks[0]) and same(qs[2], ks[2]) and same(qs[3], ks[3]) and same(cs[1:], (qs[2], qs[3]))):
        return f"q {qs}, k {ks} and cos {cs} do not fit together"
    return None


def _cache_write(source) -> Optional[Any]:
    """The only user of `source` if it is cache.index_copy_(2, pos, source) with an unused result."""
    user = only_user(source)
    if kind(user) != "index_copy_" or user.users or arg(user, 1, "dim") not in (2, -2) \
            or arg(user, 3, "source") is not source:
        return None
    return user


def _v_write(k_write) -> Optional[Any]:
    pos = arg(k_write, 2, "index")
    for user in pos.users:
        if user is not k_write and kind(user) == "index_copy_" and not user.users \
                and arg(user, 1, "dim") in (2, -2) and user.args[0] is not k_write.args[0]:
            return user
    return None


class RopePattern:
    names = ("rope_cache_write", "rope")

    def apply(self, ctx: Context) -> None:
        groups = collections.defaultdict(list)
        for node in list(ctx.graph.nodes):
            if kind(node) == "add":
                m = match_rope(node)
                if m is not None:
                    groups[(m.cos, m.sin)].append(m)
        for matches in groups.values():
            if len(matches) % 2:
                ctx.report.near_miss("rope", matches[-1].out, "rotary embedding applied to one tensor only")
                matches = matches[:-1]
            for q, k in zip(matches[0::2], matches[1::2]):
                if _cache_write(q.out) is not None:
                    q, k = k, q
                problem = _problem(q, k)
                if problem:
                    ctx.report.near_miss("rope", q.out, problem)
                elif not (ctx.enabled("rope_cache_write") and self._with_cache(ctx, q, k)) and ctx.enabled("rope"):
                    self._plain(ctx, q, k)

    def _plain(self, ctx: Context, q: RopeMatch, k: RopeMatch) -> None:
        before, earlier = (k.out, q.out) if ctx.order(k.out) > ctx.order(q.out) else (q.out, k.out)
        if any(ctx.order(u) < ctx.order(before) for u in earlier.users):
            ctx.report.near_miss("rope", earlier, "rotated q (or k) is used before the other is rotated")
            return
        fused = ctx.call(OPS.rope.default, (q.x, k.x, *_cos_sin(q)), before, like=(val(q.out), val(k.out)))
        ctx.replace(q.out, ctx.getitem(fused, 0, q.out), q.nodes)
        ctx.replace(k.out, ctx.getitem(fused, 1, k.out), k.nodes)
        ctx.report.matched("rope", f"{q.out.name}, {k.out.name}")

    def _with_cache(self, ctx: Context, q: RopeMatch, k: RopeMatch) -> bool:
        k_write = _cache_write(k.out)
        v_write = _v_write(k_write) if k_write is not None else None
        if v_write is None:
            return False
        v, pos = arg(v_write, 3, "source"), arg(k_write, 2, "index")
        k_cache, v_cache = k_write.args[0], v_write.args[0]
        if not same(shape(v), shape(k.x)) or dtype(v) != dtype(k.x):
            ctx.report.near_miss("rope_cache_write", k_write, f"v {shape(v)} {dtype(v)} does not match k")
            return False
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if dtype(cache) != dtype(k.x) or len(shape(cache)) != 4:
                ctx.report.near_miss("rope_cache_write", k_write, f"{name} {shape(cache)} {dtype(cache)} "
                                                                  f"does not hold k's dtype {dtype(k.x)}")
                return False
        at = min(ctx.order(k_write), ctx.order(v_write))
        anchor = k_write if ctx.order(k_write) == at else v_write
        late_q_user = [u for u in q.out.users if ctx.order(u) < at]
        if any(ctx.order(n) >= at for n in (v, pos, k.out, q.out)) or late_q_user:
            ctx.report.near_miss("rope_cache_write", k_write, "q/k/v or the positions are computed after the "
                                                              "cache write, or rotated q is used before it")
            return False
        fused = ctx.call(OPS.rope_cache_write.default,
                         (q.x, k.x, v, *_cos_sin(q), k_cache, v_cache, pos), anchor, like=val(q.out))
        ctx.replace(q.out, fused, q.nodes)
        ctx.graph.erase_node(k_write)
        ctx.graph.erase_node(v_write)
        ctx.consumed.extend(k.nodes + [k.out])
        ctx.report.matched("rope_cache_write", f"{q.out.name}, {k.out.name} + cache writes of k and v")
        return True
