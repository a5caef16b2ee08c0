"""fusedops::rms_norm — RMSNorm forward with LlamaRMSNorm's exact rounding (csrc/rmsnorm.cu)."""
from __future__ import annotations

import ctypes

import torch

from ..runtime import register_source
from ._launch import (DTYPE_SUFFIX, aligned16, check_cuda, check_dtype, check_same_dtype, kernel,
                      rows_view)

SOURCE = register_source("rmsnorm", "rmsnorm.cu")


class RmsNormParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("x_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
                ("eps", ctypes.c_float)]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm.forward, verbatim in meaning: fp32 statistics, cast back before the weight."""
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(var + eps)).to(x.dtype)


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_dtype("x", x)
    check_same_dtype("weight", weight, "x", x)
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match x's last dim "
                         f"({tuple(x.shape)})")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")


@torch.library.custom_op("fusedops::rms_norm", mutates_args=(), device_types="cpu")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _validate(x, weight, eps)
    return rms_norm_reference(x, weight, eps).contiguous()


@rms_norm.register_fake
def _(x, weight, eps):
    _validate(x, weight, eps)
    return x.new_empty(x.shape)


@rms_norm.register_kernel("cuda")
def _(x, weight, eps):
    _validate(x, weight, eps)
    check_cuda("x", x)
    check_cuda("weight", weight, x.device)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    x2, out2 = rows_view("x", x), out.view(-1, x.shape[-1])
    rows, hidden = x2.shape
    weight = weight.contiguous()
    vec = 16 // x.element_size()
    vector_ok = hidden % vec == 0 and x2.stride(0) % vec == 0 and aligned16(x2, weight)
    nvec = hidden // vec if vector_ok else hidden
    if vector_ok and nvec <= 4096:
        items = 1 if nvec <= 1024 else 2 if nvec <= 2048 else 4
        threads = max(32, (-(-nvec // items) + 31) // 32 * 32)
        variant = f"c{items}"
    else:
        threads, variant = min(1024, (nvec + 31) // 32 * 32), ("sv" if vector_ok else "s1")
    params = RmsNormParams(out2.data_ptr(), x2.data_ptr(), weight.data_ptr(), rows, hidden,
                           x2.stride(0), out2.stride(0), float(eps))
    k = kernel(SOURCE, f"rmsnorm_{DTYPE_SUFFIX[x.dtype]}_{variant}", RmsNormParams, x.device)
    k.launch((rows,), (threads,), params)
    return out
