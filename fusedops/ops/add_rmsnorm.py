"""fusedops::add_rms_norm — h = x + residual; y = rms_norm(h); returns (y, h) (csrc/add_rmsnorm.cu).
h is returned rounded to the model dtype; the norm is taken of the unrounded sum (one rounding fewer on
every norm input than eager's order, as Inductor's fused add + norm computes it).

Non-contiguous x / residual: rows may be strided; a non-unit last stride is copied."""
from __future__ import annotations

import ctypes

import torch

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, check_cuda, check_same_dtype, kernel, rows_view
from .rmsnorm import _validate as _validate_norm
from .rmsnorm import rms_norm_reference, row_variant, vector_friendly

SOURCE = register_source("add_rmsnorm", "add_rmsnorm.cu")


class AddRmsNormParams(ctypes.Structure):
    _fields_ = [("y", ctypes.c_void_p), ("h", ctypes.c_void_p), ("x", ctypes.c_void_p),
                ("residual", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("x_row_stride", ctypes.c_int64), ("residual_row_stride", ctypes.c_int64),
                ("out_row_stride", ctypes.c_int64), ("eps", ctypes.c_float)]


def add_rms_norm_reference(x, residual, weight, eps):
    """HF decoder-layer order, `hidden = residual + hidden` then LlamaRMSNorm, with the norm taken of the
    fp32 sum; h (returned) is that sum rounded to the model dtype, exactly HF's residual."""
    total = residual.float() + x.float()
    return rms_norm_reference(total, weight.float(), eps).to(x.dtype), total.to(x.dtype)


def _validate(x, residual, weight, eps):
    _validate_norm(x, weight, eps)
    check_same_dtype("residual", residual, "x", x)
    if residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


def kernel_plan(x2, r2, weight, y2, h2, items: int | None = None) -> tuple[str, int]:
    """(kernel name, threads per CTA) for these tensors."""
    vec = 16 // x2.element_size()
    ok = vector_friendly(x2.shape[1], vec, (x2, r2, y2, h2), weight)
    variant, threads = row_variant(x2.shape[1], vec, ok, items)
    return f"add_rmsnorm_{DTYPE_SUFFIX[x2.dtype]}_{variant}", threads


def launch(x2, r2, weight, y2, h2, eps, items: int | None = None) -> None:
    rows, hidden = x2.shape
    name, threads = kernel_plan(x2, r2, weight, y2, h2, items)
    params = AddRmsNormParams(y2.data_ptr(), h2.data_ptr(), x2.data_ptr(), r2.data_ptr(),
                              weight.data_ptr(), rows, hidden, x2.stride(0), r2.stride(0),
                              y2.stride(0), float(eps))
    kernel(SOURCE, name, AddRmsNormParams, x2.device).launch((rows,), (threads,), params)


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


@add_rms_norm.register_kernel("cuda")
def _(x, residual, weight, eps):
    _validate(x, residual, weight, eps)
    check_cuda("x", x)
    check_cuda("residual", residual, x.device)
    check_cuda("weight", weight, x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y, h
    d = x.shape[-1]
    launch(rows_view("x", x), rows_view("residual", residual), weight.contiguous(), y.view(-1, d),
           h.view(-1, d), eps)
    return y, h
