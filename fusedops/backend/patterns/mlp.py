"""SwiGLU MLP: act(gate(x)) * up(x) with act = silu -> fusedops::gate_up_silu on one prepared weight
(fusedops.ops.gemm.prepare_gate_up layout; block = RewriteOptions.gate_up_block, else what the GEMM
dispatcher needs, see _default_block). down_proj is left to LinearResidualPattern."""
from __future__ import annotations

import torch

from ...ops.gemm import GATE_UP_BLOCK
from ..weights import STORE
from .base import Context
from .linear import linear_parts, weight_problem
from .nodes import binary_operands, dtype, kind, only_user, shape, val

OPS = torch.ops.fusedops


def _default_block(x, inter: int) -> int:
    """GATE_UP_BLOCK where the GEMM dispatcher routes gate_up_silu to its CUTLASS SwiGLU kernels
    (bf16 on CUDA; costs a copy of Wg and Wu), else I: plain [Wg; Wu], which aliases for free."""
    cutlass = val(x).device.type == "cuda" and dtype(x) == torch.bfloat16
    if cutlass and GATE_UP_BLOCK and inter % GATE_UP_BLOCK == 0:
        return GATE_UP_BLOCK
    return inter


class GateUpSiluPattern:
    names = ("gate_up_silu",)

    def apply(self, ctx: Context) -> None:
        for node in list(ctx.graph.nodes):
            if kind(node) == "mul" and binary_operands(node) is not None:
                for act, up in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
                    if self._try(ctx, node, act, up):
                        break

    def _try(self, ctx: Context, mul, act, up) -> bool:
        up_parts = linear_parts(up)
        if up_parts is None or not isinstance(act, torch.fx.Node) or not act.args:
            return False
        gate = act.args[0]
        gate_parts = linear_parts(gate)
        if gate_parts is None or gate_parts[0] is not up_parts[0]:
            return False
        x = up_parts[0]
        if kind(act) != "silu":
            ctx.report.near_miss("gate_up_silu", mul, f"activation {act.target} is not silu")
            return True
        if only_user(gate) is not act or only_user(act) is not mul or only_user(up) is not mul:
            ctx.report.near_miss("gate_up_silu", mul, "gate/up/act results have other users")
            return True
        if gate_parts[2] is not None or up_parts[2] is not None:
            ctx.report.near_miss("gate_up_silu", mul, "gate/up projections have a bias")
            return True
        w_gate, w_up = gate_parts[1], up_parts[1]
        problem = weight_problem(ctx, x, w_gate) or weight_problem(ctx, x, w_up)
        if problem is None and shape(w_gate) != shape(w_up):
            problem = f"gate {shape(w_gate)} and up {shape(w_up)} weights differ in shape"
        inter = shape(w_gate)[0] if problem is None else 0
        block = ctx.options.gate_up_block or (inter if ctx.options.plain_gate_up else _default_block(x, inter))
        if problem is None and inter % block:
            problem = f"gate_up_block {block} does not divide the intermediate size {inter}"
        if problem:
            ctx.report.near_miss("gate_up_silu", mul, problem)
            return True
        mode = ctx.options.weight_mode
        w_node = ctx.prepared_weight(
            "gate_up", lambda: STORE.gate_up(ctx.tensor(w_gate), ctx.tensor(w_up), block, mode),
            (2 * inter, shape(w_gate)[1]), dtype(x), mul)
        fused = ctx.call(OPS.gate_up_silu.default, (x, w_node, block), mul, like=val(mul))
        ctx.replace(mul, fused, [act, gate, up])
        ctx.report.matched("gate_up_silu", f"{gate.name}, {up.name}, silu, mul -> {mul.name} "
                                           f"(I={inter}, block={block})")
        return True
