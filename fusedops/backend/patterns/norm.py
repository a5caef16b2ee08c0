"""RMSNorm (HF LlamaRMSNorm and its Mistral/Qwen2 twins) -> fusedops::rms_norm, and a residual add
feeding one -> fusedops::add_rms_norm (whose h output also replaces the add's other users).

    h = x.to(float32)                       # absent when x is already float32
    r = rsqrt(mean(h.pow(2) | h*h, -1, keepdim=True) + eps)
    y = weight * (h * r).to(x.dtype)        # either operand order
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ...ops._launch import FLOAT_DTYPES
from .base import Context
from .nodes import (arg, binary_operands, dtype, float_const, is_cast, kind, last_dim, only_user, other_operand,
                    same, shape, val)

OPS = torch.ops.fusedops


@dataclasses.dataclass
class NormMatch:
    x: Any
    weight: Any
    eps: float
    out: Any
    nodes: list


class Miss(Exception):
    """A near-miss: the structure is an RMSNorm but something about it differs (the message says what)."""


def _statistics(rsqrt_node) -> Optional[tuple[Any, float, list]]:
    """(h, eps, nodes) for rsqrt(mean(h^2) + eps); None if this rsqrt is not an RMSNorm's."""
    add = rsqrt_node.args[0]
    if kind(add) != "add" or binary_operands(add) is None:
        return None
    a, b = add.args
    mean, eps = (a, float_const(b)) if kind(a) == "mean" else (b, float_const(a))
    if kind(mean) != "mean":
        return None
    square = mean.args[0]
    if kind(square) == "pow" and square.args[1:] == (2,):
        h = square.args[0]
    elif kind(square) == "mul" and binary_operands(square) and square.args[0] is square.args[1]:
        h = square.args[0]
    else:
        return None
    if eps is None:
        raise Miss("eps is not a Python constant")
    ndim = len(shape(h) or ())
    if not last_dim(arg(mean, 1, "dim"), ndim) or not arg(mean, 2, "keepdim", False):
        raise Miss("the mean is not over the last dim with keepdim=True")
    return h, eps, [add, mean, square]


def _same_value(a, b) -> bool:
    """a is b, or both are the same cast of the same tensor (x.float() written twice)."""
    return a is b or (is_cast(a) and is_cast(b) and a.args[0] is b.args[0] and dtype(a) == dtype(b))


def match_rms_norm(rsqrt_node) -> Optional[NormMatch]:
    stats = _statistics(rsqrt_node)
    if stats is None:
        return None
    h, eps, nodes = stats
    normed = only_user(rsqrt_node)
    if kind(normed) != "mul" or binary_operands(normed) is None \
            or not _same_value(other_operand(normed, rsqrt_node), h):
        raise Miss("rsqrt does not multiply the same tensor whose square was averaged")
    nodes.append(other_operand(normed, rsqrt_node))
    x = h.args[0] if is_cast(h) else h
    x_dtype = dtype(x)
    if dtype(h) != torch.float32:
        raise Miss(f"statistics computed in {dtype(h)}, not float32")
    if x_dtype not in FLOAT_DTYPES:
        raise Miss(f"input dtype {x_dtype} has no kernel")
    cast = only_user(normed)
    back = cast
    if is_cast(cast):
        if dtype(cast) != x_dtype:
            raise Miss(f"normalized value is cast to {dtype(cast)}, not back to the input dtype {x_dtype}")
    elif x_dtype == torch.float32:
        back = normed  # float32 model without the (no-op) cast
    else:
        raise Miss(f"no cast back to the input dtype {x_dtype} before the weight")
    out = only_user(back)
    if kind(out) != "mul" or binary_operands(out) is None:
        raise Miss("the normalized value is not multiplied by a weight (or has other users)")
    weight = other_operand(out, back)
    if dtype(weight) != x_dtype or shape(weight) is None or len(shape(weight)) != 1 \
            or not same(shape(weight)[0], shape(x)[-1]):
        raise Miss(f"weight {dtype(weight)} {shape(weight)} is not a [{shape(x)[-1]}] vector of the "
                   f"input dtype {x_dtype}")
    if dtype(out) != x_dtype:
        raise Miss(f"output dtype {dtype(out)} differs from the input dtype {x_dtype}")
    nodes += [rsqrt_node, normed] + ([cast] if back is cast else []) + ([h] if h is not x else [])
    return NormMatch(x, weight, eps, out, nodes)


def _residual_add(node) -> Optional[tuple[Any, Any]]:
    """(x, residual) when node is `residual + x` of two same-shape, same-dtype tensors."""
    if kind(node) != "add" or binary_operands(node) is None:
        return None
    residual, x = node.args
    if val(residual) is None or val(x) is None or dtype(residual) != dtype(x) \
            or not same(shape(residual), shape(x)):
        return None
    return x, residual


def norm_residual_adds(graph) -> set:
    """The residual adds RmsNormPattern fuses into add_rms_norm: `residual + x` feeding an RMSNorm
    whose weight is a parameter or buffer."""
    adds = set()
    for node in graph.nodes:
        if kind(node) != "rsqrt":
            continue
        try:
            m = match_rms_norm(node)
        except Miss:
            continue
        if m is not None and m.weight.op in ("placeholder", "get_attr") and _residual_add(m.x) is not None:
            adds.add(m.x)
    return adds


class RmsNormPattern:
    names = ("add_rms_norm", "rms_norm")

    def apply(self, ctx: Context) -> None:
        for node in list(ctx.graph.nodes):
            if kind(node) != "rsqrt":
                continue
            try:
                m = match_rms_norm(node)
            except Miss as miss:
                ctx.report.near_miss("rms_norm", node, str(miss))
                continue
            if m is None:
                continue
            pair = _residual_add(m.x) if ctx.enabled("add_rms_norm") and m.weight.op in (
                "placeholder", "get_attr") else None   # keep in step with norm_residual_adds
            if pair is not None:
                x, residual = pair
                # right after the add, so that h exists before every user of the add
                fused = ctx.call(OPS.add_rms_norm.default, (x, residual, m.weight, m.eps), m.x.next,
                                 like=(val(m.out), val(m.x)))
                y, h = ctx.getitem(fused, 0, m.out), ctx.getitem(fused, 1, m.x)
                ctx.replace(m.out, y, m.nodes)
                ctx.replace(m.x, h, [])
                ctx.report.matched("add_rms_norm", f"{m.x.name} -> add + RMSNorm (eps={m.eps:g}) "
                                                   f"into {m.out.name}")
            elif ctx.enabled("rms_norm"):
                fused = ctx.call(OPS.rms_norm.default, (m.x, m.weight, m.eps), m.out, like=val(m.out))
                ctx.replace(m.out, fused, m.nodes)
                ctx.report.matched("rms_norm", f"{len(m.nodes) + 1} nodes into {m.out.name} (eps={m.eps:g})")
