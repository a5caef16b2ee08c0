"""fusedops::layer_norm — LayerNorm over the last dim with optional weight and bias (csrc/layernorm.cu).

Non-contiguous input: rows may be strided; a non-unit last stride is copied."""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, aligned16, check_cuda, check_dtype, check_same_dtype, kernel, rows_view

SOURCE = register_source("layernorm", "layernorm.cu")

CACHED_ITEMS = (1, 2, 4)   # row vectors a thread keeps in registers (c8 spilled)
CACHED_THREADS = 512       # kCachedThreads in csrc/layernorm.cu


class LayerNormParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("rows", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("x_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
                ("eps", ctypes.c_float)]


def layer_norm_reference(x, weight, bias, eps):
    """torch's own layer_norm (fp32 statistics and affine for 16-bit inputs, one rounding)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _validate(x, weight, bias, eps):
    check_dtype("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_same_dtype(name, t, "x", x)
        if t.dim() != 1 or t.shape[0] != x.shape[-1]:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match x's last dim ({tuple(x.shape)})")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")


def launch(x2, weight, bias, out2, eps) -> None:
    rows, hidden = x2.shape
    vec = 16 // x2.element_size()
    affine = [t for t in (weight, bias) if t is not None]
    vector_ok = (hidden % vec == 0 and x2.stride(0) % vec == 0 and out2.stride(0) % vec == 0
                 and aligned16(x2, out2, *affine))
    nvec = hidden // vec if vector_ok else hidden
    items = next((i for i in CACHED_ITEMS if nvec <= i * CACHED_THREADS), None) if vector_ok else None
    if items is not None:
        name, threads = f"c{items}", max(32, (-(-nvec // items) + 31) // 32 * 32)
    else:
        name, threads = ("sv" if vector_ok else "s1"), min(1024, (nvec + 31) // 32 * 32)
    params = LayerNormParams(out2.data_ptr(), x2.data_ptr(), weight.data_ptr() if weight is not None else None,
                             bias.data_ptr() if bias is not None else None, rows, hidden, x2.stride(0),
                             out2.stride(0), float(eps))
    k = kernel(SOURCE, f"layernorm_{DTYPE_SUFFIX[x2.dtype]}_{name}", LayerNormParams, x2.device)
    k.launch((rows,), (threads,), params)


@torch.library.custom_op("fusedops::layer_norm", mutates_args=(), device_types="cpu")
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    _validate(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps).contiguous()


@layer_norm.register_fake
def _(x, weight, bias, eps):
    _validate(x, weight, bias, eps)
    return x.new_empty(x.shape)


@layer_norm.register_kernel("cuda")
def _(x, weight, bias, eps):
    _validate(x, weight, bias, eps)
    check_cuda("x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_cuda(name, t, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        launch(rows_view("x", x), weight.contiguous() if weight is not None else None,
               bias.contiguous() if bias is not None else None, out.view(-1, x.shape[-1]), eps)
    return out
