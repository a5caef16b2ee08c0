"""fusedops::add_rms_norm — h = x + residual; y = rms_norm(h); returns (y, h) (csrc/add_rmsnorm.cu).
The norm is taken of the unrounded fp32 sum (one rounding fewer on every norm input than eager's order, as
Inductor's fused add + norm computes it). h is returned in the model dtype (x's), or in fp32 with
fp32_h=True; the residual may be fp32 too. That is how the rewrite carries the residual stream in fp32
from one fused add to the next (fusedops/backend/patterns/residual.py).

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


def add_rms_norm_reference(x, residual, weight, eps, fp32_h: bool = False):
    """HF decoder-layer order, `hidden = residual + hidden` then LlamaRMSNorm, with the norm taken of the
    fp32 sum; h (returned) is that sum rounded to the model dtype (exactly HF's residual), or the fp32 sum."""
    total = residual.float() + x.float()
    y = rms_norm_reference(total, weight.float(), eps).to(x.dtype)
    return y, (total if fp32_h else total.to(x.dtype))


def _validate(x, residual, weight, eps):
    _validate_norm(x, weight, eps)
    if residual.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"residual: dtype {residual.dtype} is neither x's dtype {x.dtype} nor float32")
    if residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")


def _io_suffix(x2, r2, h2) -> str:
    """Kernel name suffix for where the residual stream is fp32 (csrc/add_rmsnorm.cu)."""
    if x2.dtype == torch.float32:
        return ""
    r32, h32 = r2.dtype == torch.float32, h2.dtype == torch.float32
    return ("_r32" if r32 else "") + (("h32" if r32 else "_h32") if h32 else "")


def kernel_plan(x2, r2, weight, y2, h2, items: int | None = None) -> tuple[str, int]:
    """(kernel name, threads per CTA) for these tensors."""
    vec = 16 // x2.element_size()
    # a vector is vec elements of each tensor: fp32 residual / h rows must hold whole ones, aligned to their size
    ok = vector_friendly(x2.shape[1], vec, (x2, r2, y2, h2), weight) and all(
        t.data_ptr() % (vec * t.element_size()) == 0 for t in (r2, h2))
    variant, threads = row_variant(x2.shape[1], vec, ok, items)
    return f"add_rmsnorm_{DTYPE_SUFFIX[x2.dtype]}_{variant}{_io_suffix(x2, r2, h2)}", threads


def launch(x2, r2, weight, y2, h2, eps, items: int | None = None) -> None:
    rows, hidden = x2.shape
    name, threads = kernel_plan(x2, r2, weight, y2, h2, items)
    params = AddRmsNormParams(y2.data_ptr(), h2.data_ptr(), x2.data_ptr(), r2.data_ptr(),
                              weight.data_ptr(), rows, hidden, x2.stride(0), r2.stride(0),
                              y2.stride(0), float(eps))
    kernel(SOURCE, name, AddRmsNormParams, x2.device).launch((rows,), (threads,), params)


def _h_dtype(x: torch.Tensor, fp32_h: bool) -> torch.dtype:
    return torch.float32 if fp32_h else x.dtype


@torch.library.custom_op("fusedops::add_rms_norm", mutates_args=(), device_types="cpu")
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, fp32_h: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(x, residual, weight, eps)
    y, h = add_rms_norm_reference(x, residual, weight, eps, fp32_h)
    return y.contiguous(), h.contiguous()


@add_rms_norm.register_fake
def _(x, residual, weight, eps, fp32_h=False):
    _validate(x, residual, weight, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=_h_dtype(x, fp32_h))


@add_rms_norm.register_kernel("cuda")
def _(x, residual, weight, eps, fp32_h=False):
    _validate(x, residual, weight, eps)
    check_cuda("x", x)
    check_cuda("residual", residual, x.device)
    check_cuda("weight", weight, x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=_h_dtype(x, fp32_h), device=x.device)
    if x.numel() == 0:
        return y, h
    d = x.shape[-1]
    launch(rows_view("x", x), rows_view("residual", residual), weight.contiguous(), y.view(-1, d),
           h.view(-1, d), eps)
    return y, h
