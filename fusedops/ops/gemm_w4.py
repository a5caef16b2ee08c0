"""int4 weight-only (W4A16) projections over fusedops.quant's packed weights (csrc/gemv_w4.cu):

    fusedops::linear_w4(x, qweight, scales, zeros, group)                     x @ W^T
    fusedops::linear_residual_w4(x, qweight, scales, zeros, group, residual)  residual + x @ W^T
    fusedops::gate_up_silu_w4(x, qweight, scales, zeros, group)               silu(x Wg^T) * (x Wu^T)

W = quant.dequantize(qweight, scales, zeros, group) (rounded to the model dtype), zeros None means
symmetric; gate_up_silu_w4's qweight packs [Wg; Wu] (gate rows first, block = I). The CPU references and
the dequantize route multiply by that rounded W; the GEMV multiplies x by the exact q - z and scales the
fp32 sums of each group by s, i.e. by the unrounded (q - z) * s (closer to the float64 value; the GPU tests
bound both against float64). Like the bf16 GEMV, it adds the residual and forms silu(g) * u in fp32 and
rounds once.

CUDA: up to MAX_GEMV_TOKENS tokens (and a power-of-two group >= MIN_GEMV_GROUP) run the tensor-core GEMV,
one 8-token mma tile for M <= 8, two up to 16; more tokens, or groups of 32 / 64, dequantize the weight into
a scratch tensor and run cuBLAS (prefill is compute-bound anyway).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..quant import PACK, check_group, dequantize
from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, check_cuda, check_dtype, check_same_dtype, kernel, rows_view
from .gemm import gate_up_silu_reference, gate_up_silu_torch, linear_residual_reference

SOURCE = register_source("gemv_w4", "gemv_w4.cu")
MAX_GEMV_TOKENS = 16                # two 8-token mma tiles (the gemv_w4_*_m16 kernels)
ROWS_PER_CTA = 16                   # outputs a CTA owns (SwiGLU: their 16 gate + 16 up rows)
# (warps, 16-byte loads per W row per lane per step, min CTAs an SM = ptxas register cap) compiled per
# (kind, token tile) in csrc/gemv_w4.cu; default_tuning picks one.
TUNINGS = {
    ("linear", 8): ((8, 1, 4), (8, 2, 2), (16, 1, 2), (4, 4, 3)),
    ("linear", 16): ((8, 1, 3), (16, 1, 1), (4, 2, 4)),
    ("swiglu", 8): ((8, 1, 3), (4, 1, 4), (4, 2, 3), (16, 1, 1)),
    ("swiglu", 16): ((8, 1, 2), (4, 2, 2), (16, 1, 1)),
}
# H200 graph replay on the Llama-3-8B shapes (perf/notes/int4.md, runs 7-8, 2026-12-03): a linear whose grid
# fits 2 CTAs an SM streams fastest with 16 warps x 1 load (M = 1: o_proj 5.0 us vs 5.3 for 8 x 2, the
# H100's choice in run 3; down 11.6 vs 12.9), a wider grid (q/k/v, 384 CTAs) at
# 4 x 4, 3 CTAs an SM in one wave (6.4 vs 7.3-8.4). At M = 16 the narrow grids take 4 x 2 (o 9.4 vs 11.4,
# down 25.2 vs 32.0), q/k/v 8 x 1 (11.3 vs 14.6). SwiGLU: 4 x 2 at 3 CTAs an SM (22.7 us, 8 x 1 22.8) and
# 8 x 1 at M = 16 (35.7 vs 38.6).
TUNING = {("linear", 8): (16, 1, 2), ("linear", 16): (4, 2, 4), ("swiglu", 8): (4, 2, 3),
          ("swiglu", 16): (8, 1, 2)}
WIDE_LINEAR_TUNING = {8: (4, 4, 3), 16: (8, 1, 3)}   # linear, more CTAs than 2 an SM
MIN_GEMV_GROUP = 128                # the scale is applied per mma: a quad's 128 k must share one group
DEQUANT_THREADS = 256
DTYPES = (torch.bfloat16, torch.float16)
KINDS = {"linear": "linear", "linear_residual": "linear", "gate_up_silu": "swiglu"}


class GemvW4Params(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("qweight", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("residual", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("x_stride", ctypes.c_int64), ("out_stride", ctypes.c_int64), ("res_stride", ctypes.c_int64),
                ("group_shift", ctypes.c_int64)]


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
    return linear_residual_reference(x, _weight(x, qweight, scales, zeros, group), residual)


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

def token_tile(m: int) -> int:
    return 8 if m <= 8 else 16


def default_tuning(kind: str, tile: int, ctas: int, sms: int) -> tuple[int, int, int]:
    if kind == "linear" and ctas > 2 * sms:
        return WIDE_LINEAR_TUNING[tile]
    return TUNING[kind, tile]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kernel_name(kind: str, dtype: torch.dtype, m: int, tuning: Optional[tuple[int, int, int]] = None) -> str:
    tile = token_tile(m)
    tuning = tuning or TUNING[kind, tile]
    if tuning not in TUNINGS[kind, tile]:
        raise ValueError(f"tuning: {tuning} is not compiled for {kind} m{tile} (one of {TUNINGS[kind, tile]})")
    warps, unroll, blocks = tuning
    return f"gemv_w4_{kind}_{DTYPE_SUFFIX[dtype]}_m{tile}_w{warps}_u{unroll}_b{blocks}"


def _packed(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Weight-side tensors as the kernels read them: contiguous rows from a 16-byte aligned start."""
    if t is None:
        return None
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.contiguous().clone()


def launch_gemv(epilogue: str, x2, qweight, scales, zeros, group, out2, residual2=None, tuning=None) -> None:
    """x2 [M <= 16, K] (unit last stride, 16-byte aligned rows) -> out2 [M, N_out]; group a power of two
    >= MIN_GEMV_GROUP."""
    qweight, scales, zeros = _packed(qweight), _packed(scales), _packed(zeros)
    m, k = x2.shape
    n = qweight.shape[0]
    kind = KINDS[epilogue]
    params = GemvW4Params(out2.data_ptr(), x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                          zeros.data_ptr() if zeros is not None else None,
                          residual2.data_ptr() if residual2 is not None else None,
                          m, n, k, x2.stride(0), out2.stride(0),
                          residual2.stride(0) if residual2 is not None else 0, group.bit_length() - 1)
    ctas = -(-(n // 2 if kind == "swiglu" else n) // ROWS_PER_CTA)
    device = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    tuning = tuning or default_tuning(kind, token_tile(m), ctas, _sm_count(device))
    kernel(SOURCE, kernel_name(kind, x2.dtype, m, tuning), GemvW4Params, x2.device).launch(
        (ctas,), (32 * tuning[0],), params)


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


def _gemv_input(x: torch.Tensor, group: int) -> Optional[torch.Tensor]:
    """x as [M, K] rows the GEMV can read (16-byte aligned), or None when M or the group is out of its range."""
    x2 = rows_view("x", x)
    if not 0 < x2.shape[0] <= MAX_GEMV_TOKENS or group & (group - 1) or group < MIN_GEMV_GROUP:
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
    x2 = _gemv_input(x, group)
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
    x2 = _gemv_input(x, group)
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
    x2 = _gemv_input(x, group)
    if x2 is None:
        w = dequantize_cuda(qweight, scales, zeros, group, x.dtype)
        return gate_up_silu_torch(x, w, qweight.shape[0] // 2)
    out = x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))
    launch_gemv("gate_up_silu", x2, qweight, scales, zeros, group, out.view(x2.shape[0], -1))
    return out
