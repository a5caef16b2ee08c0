"""fusedops::silu_mul (silu(g) * u) and fusedops::silu_mul_cat (the same on one [..., 2I] tensor)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import check_dtype, check_same_dtype


def silu_mul_reference(g, u):
    """HF LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), each op rounded to the model dtype."""
    return F.silu(g) * u


def _validate(g, u):
    check_dtype("g", g)
    check_same_dtype("u", u, "g", g)
    if g.shape != u.shape:
        raise ValueError(f"u: shape {tuple(u.shape)} differs from g's {tuple(g.shape)}")


@torch.library.custom_op("fusedops::silu_mul", mutates_args=(), device_types="cpu")
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _validate(g, u)
    return silu_mul_reference(g, u).contiguous()


@silu_mul.register_fake
def _(g, u):
    _validate(g, u)
    return g.new_empty(g.shape)


def _validate_cat(gu):
    check_dtype("gu", gu)
    if gu.dim() == 0 or gu.shape[-1] % 2:
        raise ValueError(f"gu: last dim must be even ([..., 2*I]), got shape {tuple(gu.shape)}")


@torch.library.custom_op("fusedops::silu_mul_cat", mutates_args=(), device_types="cpu")
def silu_mul_cat(gu: torch.Tensor) -> torch.Tensor:
    _validate_cat(gu)
    g, u = gu.chunk(2, dim=-1)
    return silu_mul_reference(g, u).contiguous()


@silu_mul_cat.register_fake
def _(gu):
    _validate_cat(gu)
    return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))
