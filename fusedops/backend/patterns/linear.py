"""Projection patterns:
  - q/k/v projections of one input -> one fusedops::linear on a stacked [Wq; Wk; Wv] (+ bias, Qwen2),
    split back into q, k, v views;
  - a bias-free projection whose only use is a residual add (o_proj, down_proj) ->
    fusedops::linear_residual, unless the sum feeds an RMSNorm: then add_rms_norm takes the add and
    normalizes the unrounded fp32 sum. Both move the same bytes (the GEMM writes o and the norm reads it,
    or the GEMM reads the residual and writes h), but the epilogue's rounded h put one more bf16
    rounding of the residual stream on every norm input: at 32 Llama layers that made the logits 1 %
    further from fp32 than Inductor's (which fuses add + norm), on each of 4 prompts;
  - any other projection on a 2-D parameter (lm_head) -> fusedops::linear, whose decode-size route
    (the GEMV) streams the weight faster than cuBLAS (lm_head at M = 1: 372 -> 337 us on the H100).
"""
from __future__ import annotations

import collections
from typing import Any, Optional

import torch

from ...ops._launch import FLOAT_DTYPES
from ..weights import STORE
from .base import Context
from .nodes import arg, binary_operands, dtype, kind, only_user, same, shape, val
from .norm import norm_residual_adds

OPS = torch.ops.fusedops


def linear_parts(node) -> Optional[tuple[Any, Any, Any]]:
    """(x, weight, bias) of an F.linear node."""
    if kind(node) != "linear":
        return None
    return node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")


def weight_problem(ctx: Context, x, weight, bias=None) -> Optional[str]:
    """Why this projection cannot use a prepared/stacked weight (None if it can)."""
    if dtype(x) not in FLOAT_DTYPES:
        return f"dtype {dtype(x)} has no fusedops kernel"
    if weight.op != "placeholder" or val(weight) is None or len(shape(weight)) != 2:
        return f"weight {weight.name} is not a 2-D parameter input"
    if dtype(weight) != dtype(x):
        return f"weight dtype {dtype(weight)} differs from the input's {dtype(x)}"
    if bias is not None and (bias.op != "placeholder" or dtype(bias) != dtype(x)):
        return f"bias {bias} is not a parameter of the input dtype"
    if not ctx.options.dry_run and ctx.tensor(weight) is None:
        return f"weight {weight.name} has no real tensor behind it"
    return None


class QkvPattern:
    names = ("qkv",)

    def apply(self, ctx: Context) -> None:
        groups = collections.defaultdict(list)
        for node in ctx.graph.nodes:
            parts = linear_parts(node)
            if parts is not None:
                groups[parts[0]].append(node)
        for x, linears in groups.items():
            if len(linears) == 1:
                continue
            if len(linears) != 3:
                ctx.report.near_miss("qkv", linears[0], f"{len(linears)} projections share input {x}, not 3")
                continue
            self._fuse(ctx, x, linears)

    def _fuse(self, ctx: Context, x, linears) -> None:
        weights = [arg(n, 1, "weight") for n in linears]
        biases = [arg(n, 2, "bias") for n in linears]
        if len({b is None for b in biases}) != 1:
            ctx.report.near_miss("qkv", linears[0], "some of q/k/v have a bias and some do not")
            return
        for w, b in zip(weights, biases):
            problem = weight_problem(ctx, x, w, b)
            if problem:
                ctx.report.near_miss("qkv", linears[0], problem)
                return
        if len({shape(w)[1] for w in weights}) != 1:
            ctx.report.near_miss("qkv", linears[0], "q/k/v weights differ in K")
            return
        rows = [shape(w)[0] for w in weights]
        first, mode = linears[0], ctx.options.weight_mode
        stacked_shape = (sum(rows), shape(weights[0])[1])
        w_node = ctx.prepared_weight(
            "qkv", lambda: STORE.rows("qkv", [ctx.tensor(w) for w in weights], mode), stacked_shape,
            dtype(x), first)
        b_node = None
        if biases[0] is not None:
            b_node = ctx.prepared_weight(
                "qkv_bias", lambda: STORE.rows("qkv_bias", [ctx.tensor(b) for b in biases], mode),
                (sum(rows),), dtype(x), first)
        out = ctx.call(OPS.linear.default, (x, w_node, b_node), first)
        parts = ctx.call(torch.split, (out, rows, -1), first)
        for i, node in enumerate(linears):
            piece = ctx.getitem(parts, i, node)
            ctx.replace(node, piece, [])
        ctx.report.matched("qkv", f"{', '.join(n.name for n in linears)} -> one linear on "
                                  f"[{' ; '.join(str(r) for r in rows)}] x {stacked_shape[1]}"
                                  + (" + bias" if b_node is not None else ""))


class LinearResidualPattern:
    names = ("linear_residual",)

    def apply(self, ctx: Context) -> None:
        to_norm = norm_residual_adds(ctx.graph) if ctx.enabled("add_rms_norm") else set()
        if to_norm:
            ctx.report.notes.append(f"linear_residual: {len(to_norm)} residual add(s) feeding an RMSNorm left "
                                    "to add_rms_norm (it normalizes the unrounded sum)")
        for node in list(ctx.graph.nodes):
            if kind(node) != "add" or binary_operands(node) is None or node in to_norm:
                continue
            for proj, residual in ((node.args[1], node.args[0]), (node.args[0], node.args[1])):
                parts = linear_parts(proj)
                if parts is None or only_user(proj) is not node:
                    continue
                x, weight, bias = parts
                if bias is not None:
                    ctx.report.near_miss("linear_residual", proj, "projection has a bias")
                    break
                if val(residual) is None or dtype(residual) != dtype(proj) or not same(
                        shape(residual), shape(proj)):
                    ctx.report.near_miss("linear_residual", proj,
                                         f"residual {shape(residual)} {dtype(residual)} does not match "
                                         f"the projection's {shape(proj)} {dtype(proj)} (broadcast or cast)")
                    break
                if dtype(weight) != dtype(x):
                    ctx.report.near_miss("linear_residual", proj, f"weight dtype {dtype(weight)} differs "
                                                                  f"from the input's {dtype(x)}")
                    break
                fused = ctx.call(OPS.linear_residual.default, (x, weight, residual), node, like=val(node))
                ctx.replace(node, fused, [proj])
                ctx.report.matched("linear_residual", f"{proj.name} + {residual.name} -> {node.name}")
                break


PLAIN_LINEAR = "fusedops_plain_linear"   # node.meta key: this fusedops::linear was a plain projection


class PlainLinearPattern:
    """Runs last: whatever projection the fusions above left (lm_head in a Llama)."""
    names = ("linear",)

    def apply(self, ctx: Context) -> None:
        for node in list(ctx.graph.nodes):
            parts = linear_parts(node)
            if parts is None:
                continue
            x, weight, bias = parts
            problem = weight_problem(ctx, x, weight, bias)
            if problem:
                ctx.report.near_miss("linear", node, problem)
                continue
            new = ctx.call(OPS.linear.default, (x, weight, bias), node, like=val(node))
            new.meta[PLAIN_LINEAR] = True
            ctx.replace(node, new, [])
            ctx.report.matched("linear", f"{node.name} {list(shape(weight))} -> fusedops::linear")
