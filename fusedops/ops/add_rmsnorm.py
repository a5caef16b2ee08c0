"""fusedops::add_rms_norm — h = x + residual; y = rms_norm(h); returns (y, h)."""
from __future__ import annotations

import torch

from .rmsnorm import _validate as _validate_norm
from .rmsnorm import rms_norm_reference
from ._launch import check_same_dtype


def add_rms_norm_reference(x, residual, weight, eps):
    """HF decoder-layer order: `hidden = residual + hidden` in the model dtype, then LlamaRMSNorm."""
    h = residual + x
    return rms_norm_reference(h, weight, eps), h


def _validate(x, residual, weight, eps):
    _validate_norm(x, weight, eps)
    check_same_dtype("residual", residual, "x", x)
    if residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


@torch.library.custom_op("fusedops::add_rms_norm", mutates_args=(), device_types="cpu")
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, residual, weight, eps)
    y, h = add_rms_norm_reference(x, residual, weight, eps)
    return y.contiguous(), h.contiguous()


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    _validate(x, residual, weight, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape)
