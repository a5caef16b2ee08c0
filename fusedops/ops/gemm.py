"""GEMM ops for the Llama projections (y = x @ W^T, W in nn.Linear's [N, K] layout):

    fusedops::linear(x, weight, bias)          plain GEMM (fused [Wq; Wk; Wv], lm_head)
    fusedops::linear_residual(x, weight, res)  x @ W^T + res (o_proj, down_proj)
    fusedops::gate_up_silu(x, w_gate_up, block) silu(x Wg^T) * (x Wu^T) from one prepared weight

`prepare_gate_up(w_gate, w_up, block)` interleaves gate and up rows in blocks of `block` rows
([g0..g_{b-1}, u0..u_{b-1}, g_b..., ...]) so that one GEMM tile holds matching gate and up columns;
block == I (the intermediate size) is plain concatenation [Wg; Wu].

The CUDA path runs cuBLAS (through torch) where no CUTLASS instantiation is faster for the token
count M; see perf/RESULTS.md for the per-M table.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._launch import check_dtype, check_same_dtype


def prepare_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor, block: int) -> torch.Tensor:
    if w_gate.shape != w_up.shape or w_gate.dim() != 2:
        raise ValueError(f"w_up: shape {tuple(w_up.shape)} must equal w_gate's {tuple(w_gate.shape)} (2-D)")
    inter, k = w_gate.shape
    if block <= 0 or inter % block:
        raise ValueError(f"block: {block} must divide the intermediate size {inter}")
    g = w_gate.reshape(inter // block, block, k)
    u = w_up.reshape(inter // block, block, k)
    return torch.stack((g, u), dim=1).reshape(2 * inter, k).contiguous()


def split_gate_up(w_gate_up: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of prepare_gate_up (views where possible)."""
    two_i, k = w_gate_up.shape
    blocks = w_gate_up.reshape(two_i // (2 * block), 2, block, k)
    return blocks[:, 0].reshape(-1, k), blocks[:, 1].reshape(-1, k)


def _validate_linear(x, weight, name="weight"):
    check_dtype("x", x)
    check_same_dtype(name, weight, "x", x)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} does not fit x {tuple(x.shape)} "
                         f"(expected [N, {x.shape[-1] if x.dim() else '?'}])")


def _validate_bias(bias, weight, x):
    if bias is not None:
        check_same_dtype("bias", bias, "x", x)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: shape {tuple(bias.shape)} != ({weight.shape[0]},)")


@torch.library.custom_op("fusedops::linear", mutates_args=(), device_types=("cpu", "cuda"))
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    _validate_linear(x, weight)
    _validate_bias(bias, weight, x)
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias=None):
    _validate_linear(x, weight)
    _validate_bias(bias, weight, x)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _validate_residual(x, weight, residual):
    _validate_linear(x, weight)
    check_same_dtype("residual", residual, "x", x)
    if residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"residual: shape {tuple(residual.shape)} != {(*x.shape[:-1], weight.shape[0])}")


@torch.library.custom_op("fusedops::linear_residual", mutates_args=(), device_types=("cpu", "cuda"))
def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """HF order: residual + o_proj(x), rounded once per op in the model dtype."""
    _validate_residual(x, weight, residual)
    return residual + F.linear(x, weight)


@linear_residual.register_fake
def _(x, weight, residual):
    _validate_residual(x, weight, residual)
    return residual.new_empty(residual.shape)


def _validate_gate_up(x, w_gate_up, block):
    _validate_linear(x, w_gate_up, "w_gate_up")
    if block <= 0 or w_gate_up.shape[0] % (2 * block):
        raise ValueError(f"block: {block} does not tile w_gate_up's {w_gate_up.shape[0]} rows")


@torch.library.custom_op("fusedops::gate_up_silu", mutates_args=(), device_types=("cpu", "cuda"))
def gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, block: int) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T), each product rounded to the model dtype as HF's LlamaMLP does."""
    _validate_gate_up(x, w_gate_up, block)
    gu = F.linear(x, w_gate_up)
    gu = gu.reshape(*x.shape[:-1], -1, 2, block)
    return (F.silu(gu[..., 0, :]) * gu[..., 1, :]).reshape(*x.shape[:-1], -1)


@gate_up_silu.register_fake
def _(x, w_gate_up, block):
    _validate_gate_up(x, w_gate_up, block)
    return x.new_empty((*x.shape[:-1], w_gate_up.shape[0] // 2))
