"""int4 weight-only (W4A16) projections over fusedops.quant's packed weights (csrc/gemv_w4.cu):

    fusedops::linear_w4(x, qweight, scales, zeros, group)                     x @ W^T
    fusedops::linear_residual_w4(x, qweight, scales, zeros, group, residual)  residual + x @ W^T
    fusedops::gate_up_silu_w4(x, qweight, scales, zeros, group)               silu(x Wg^T) * (x Wu^T)

W = quant.dequantize(qweight, scales, zeros, group) (rounded to the model dtype), zeros None means
symmetric; gate_up_silu_w4's qweight packs [Wg; Wu] (gate rows first, block = I). Every product is
rounded to the model dtype before the residual add / SiLU, as the bf16 ops (fusedops/ops/gemm.py) do.

CUDA: up to MAX_GEMV_TOKENS tokens run the GEMV kernel (the smallest M tile >= M); more tokens
dequantize the weight into a scratch tensor and run cuBLAS. The GEMV does its multiply-adds on CUDA
cores, so from M ~ 16 it is compute-bound and dequantize + cuBLAS (tensor cores, 2.5 extra bytes
a weight) wins; prefill is compute-bound anyway.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F

from ..quant import PACK, check_group, dequantize
from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, check_cuda, check_dtype, check_same_dtype, kernel, rows_view
from .gemm import gate_up_silu_reference

SOURCE = register_source("gemv_w4", "gemv_w4.cu")
M_TILES = (1, 2, 4, 8)              # the gemv_w4_*_m<MT> instantiations
# Above 8 tokens: dequantize + cuBLAS. H100 graph replay, 2026-11-25 (perf/notes/int4.md, run 1), M = 16:
# GEMV 97 / 57 / 325 / 204 us vs dequant + cuBLAS 42 / 29 / 200 / 105 us (q/k/v, o, gate/up, down).
MAX_GEMV_TOKENS = M_TILES[-1]
WARPS, ROWS = 4, 4                  # kWarps / kRows in csrc/gemv_w4.cu: one warp per ROWS weight rows
DEQUANT_THREADS = 256
DTYPES = (torch.bfloat16, torch.float16)
EPILOGUES = {"linear": "linear", "linear_residual": "residual", "gate_up_silu": "swiglu"}


class GemvW4Params(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("qweight", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("residual", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("x_stride", ctypes.c_int64), ("out_stride", ctypes.c_int64), ("res_stride", ctypes.c_int64),
                ("group", ctypes.c_int64)]


class DequantW4Params(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("qweight", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("zeros", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("group", ctypes.c_int64)]


def _validate(x, qweight, scales, zeros, group, gate_up=False):
    check_dtype("x", x, DTYPES)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight: expected a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * PACK
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"qweight: holds K = {k}, but x has shape {tuple(x.shape)}")
    check_group(k, group)
    check_same_dtype("scales", scales, "x", x)
    if scales.shape != (n, k // group):
        raise ValueError(f"scales: shape {tuple(scales.shape)} != {(n, k // group)}")
    if zeros is not None:
        check_same_dtype("zeros", zeros, "x", x)
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros: shape {tuple(zeros.shape)} != scales' {tuple(scales.shape)}")
    if gate_up and n % 2:
        raise ValueError(f"qweight: [Wg; Wu] needs an even number of rows, got {n}")


def _validate_residual(x, qweight, residual):
    check_same_dtype("residual", residual, "x", x)
    if residual.shape != (*x.shape[:-1], qweight.shape[0]):
        raise ValueError(f"residual: shape {tuple(residual.shape)} != {(*x.shape[:-1], qweight.shape[0])}")


def _weight(x, qweight, scales, zeros, group):
    return dequantize(qweight, scales, zeros, group, x.dtype)


# ------------------------------------------------------------------ custom ops (CPU reference = default)

@torch.library.custom_op("fusedops::linear_w4", mutates_args=(), device_types="cpu")
def linear_w4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
              group: int) -> torch.Tensor:
    _validate(x, qweight, scales, zeros, group)
    return F.linear(x, _weight(x, qweight, scales, zeros, group))


@linear_w4.register_fake
def _(x, qweight, scales, zeros, group):
    _validate(x, qweight, scales, zeros, group)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("fusedops::linear_residual_w4", mutates_args=(), device_types="cpu")
def linear_residual_w4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: Optional[torch.Tensor], group: int, residual: torch.Tensor) -> torch.Tensor:
    _validate(x, qweight, scales, zeros, group)
    _validate_residual(x, qweight, residual)
    return residual + F.linear(x, _weight(x, qweight, scales, zeros, group))


@linear_residual_w4.register_fake
def _(x, qweight, scales, zeros, group, residual):
    _validate(x, qweight, scales, zeros, group)
    _validate_residual(x, qweight, residual)
    return residual.new_empty(residual.shape)


@torch.library.custom_op("fusedops::gate_up_silu_w4", mutates_args=(), device_types="cpu")
def gate_up_silu_w4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: Optional[torch.Tensor], group: int) -> torch.Tensor:
    _validate(x, qweight, scales, zeros, group, gate_up=True)
    return gate_up_silu_reference(x, _weight(x, qweight, scales, zeros, group), qweight.shape[0] // 2)


@gate_up_silu_w4.register_fake
def _(x, qweight, scales, zeros, group):
    _validate(x, qweight, scales, zeros, group, gate_up=True)
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


# ------------------------------------------------------------------ CUDA

def m_tile(m: int) -> int:
    return next(t for t in M_TILES if t >= m)


def _packed(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Weight-side tensors as the kernels read them: contiguous rows from a 16-byte aligned start."""
    if t is None:
        return None
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.contiguous().clone()


def launch_gemv(epilogue: str, x2, qweight, scales, zeros, group, out2, residual2=None) -> None:
    """x2 [M <= 16, K] (unit last stride, 16-byte aligned rows) -> out2 [M, N_out]."""
    qweight, scales, zeros = _packed(qweight), _packed(scales), _packed(zeros)
    m, k = x2.shape
    n = qweight.shape[0]
    n_out = n // 2 if epilogue == "gate_up_silu" else n
    out_rows = ROWS // 2 if epilogue == "gate_up_silu" else ROWS
    name = f"gemv_w4_{EPILOGUES[epilogue]}_{DTYPE_SUFFIX[x2.dtype]}_m{m_tile(m)}"
    params = GemvW4Params(out2.data_ptr(), x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                          zeros.data_ptr() if zeros is not None else None,
                          residual2.data_ptr() if residual2 is not None else None,
                          m, n, k, x2.stride(0), out2.stride(0),
                          residual2.stride(0) if residual2 is not None else 0, group)
    grid = -(-n_out // (out_rows * WARPS))
    kernel(SOURCE, name, GemvW4Params, x2.device).launch((grid,), (WARPS * 32,), params)


def dequantize_cuda(qweight, scales, zeros, group, dtype) -> torch.Tensor:
    """quant.dequantize on the GPU in one kernel: [N, K] in `dtype` (== scales' dtype)."""
    qweight, scales, zeros = _packed(qweight), _packed(scales), _packed(zeros)
    n, k = qweight.shape[0], qweight.shape[1] * PACK
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    words = qweight.numel()
    if words:
        params = DequantW4Params(out.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                 zeros.data_ptr() if zeros is not None else None, n, k, group)
        kernel(SOURCE, f"dequant_w4_{DTYPE_SUFFIX[dtype]}", DequantW4Params, qweight.device).launch(
            (-(-words // DEQUANT_THREADS),), (DEQUANT_THREADS,), params)
    return out


def _gemv_input(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x as [M, K] rows the GEMV can read (16-byte aligned), or None when M is out of its range."""
    x2 = rows_view("x", x)
    if not 0 < x2.shape[0] <= MAX_GEMV_TOKENS:
        return None
    if x2.data_ptr() % 16 or (x2.shape[0] > 1 and x2.stride(0) % 8):
        x2 = x2.contiguous()
    return x2


def _check_devices(x, qweight, scales, zeros, residual=None):
    check_cuda("x", x)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("residual", residual)):
        if t is not None:
            check_cuda(name, t, x.device)


@linear_w4.register_kernel("cuda")
def _(x, qweight, scales, zeros, group):
    _validate(x, qweight, scales, zeros, group)
    _check_devices(x, qweight, scales, zeros)
    x2 = _gemv_input(x)
    if x2 is None:
        return F.linear(x, dequantize_cuda(qweight, scales, zeros, group, x.dtype))
    out = x.new_empty((*x.shape[:-1], qweight.shape[0]))
    launch_gemv("linear", x2, qweight, scales, zeros, group, out.view(x2.shape[0], -1))
    return out


@linear_residual_w4.register_kernel("cuda")
def _(x, qweight, scales, zeros, group, residual):
    _validate(x, qweight, scales, zeros, group)
    _validate_residual(x, qweight, residual)
    _check_devices(x, qweight, scales, zeros, residual)
    x2 = _gemv_input(x)
    if x2 is None:
        return residual + F.linear(x, dequantize_cuda(qweight, scales, zeros, group, x.dtype))
    out = residual.new_empty(residual.shape)
    launch_gemv("linear_residual", x2, qweight, scales, zeros, group, out.view(x2.shape[0], -1),
                rows_view("residual", residual))
    return out


@gate_up_silu_w4.register_kernel("cuda")
def _(x, qweight, scales, zeros, group):
    _validate(x, qweight, scales, zeros, group, gate_up=True)
    _check_devices(x, qweight, scales, zeros)
    x2 = _gemv_input(x)
    if x2 is None:
        w = dequantize_cuda(qweight, scales, zeros, group, x.dtype)
        return gate_up_silu_reference(x, w, qweight.shape[0] // 2)
    out = x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))
    launch_gemv("gate_up_silu", x2, qweight, scales, zeros, group, out.view(x2.shape[0], -1))
    return out
