"""The residual stream in fp32 between fused adds: an add_rms_norm whose h feeds nothing but the residual
input of later add_rms_norms returns h in fp32 (fp32_h=True), and those read it as an fp32 residual.

HF's decoder layer rounds `hidden = residual + hidden` to the model dtype after every add; the stream is
rounded 2L times in L layers, and the rounding errors of a stream that grows with depth land on every later
layer. Inductor keeps part of the stream unrounded (it recomputes a cheap add inside the kernels that use
it instead of storing it); on a CPU stand-in (tiny Llama, 8 layers, 2 prompts, reference ops) fp32 h took
fusedops' logits error vs the fp32 model from 1.303e-2 to 1.222e-2, Inductor's level (1.223e-2), from
6 % above it. The cost is the wider h: 2 more bytes per element read and written per add (nothing at
decode sizes; ≈ 0.7 ms of a 2k-token Llama-3-8B prefill). An h that anything else reads (a graph output,
another op) stays in the model dtype: what the model returns does not change dtype.
"""
from __future__ import annotations

import operator

import torch

from .base import Context

OPS = torch.ops.fusedops


def _residual_only_users(h) -> bool:
    """Every user of h is an add_rms_norm that reads it as its residual (argument 1) and nowhere else."""
    return bool(h.users) and all(
        u.target is OPS.add_rms_norm.default and u.args[1] is h and h not in (u.args[0], *u.args[2:])
        for u in h.users)


class ResidualStreamPattern:
    """Runs after RmsNormPattern (it works on the add_rms_norm calls that pattern made)."""
    names = ("residual_fp32",)

    def apply(self, ctx: Context) -> None:
        if not ctx.enabled("residual_fp32"):
            return
        for node in list(ctx.graph.nodes):
            if node.target is not OPS.add_rms_norm.default or len(node.args) > 4:
                continue
            value = node.meta.get("example_value")
            if value is None or value[0].dtype not in (torch.bfloat16, torch.float16):
                continue
            hs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
            if len(hs) != 1 or not _residual_only_users(hs[0]):
                continue
            node.args = (*node.args, True)
            h = hs[0]
            h.meta["example_value"] = value[1].to(torch.float32)
            node.meta["example_value"] = (value[0], h.meta["example_value"])
            ctx.report.matched("residual_fp32", f"{h.name} -> {', '.join(u.name for u in h.users)} in fp32")
