"""Skinny GEMM for decode token counts (M <= 16), csrc/gemv.cu: the weight-streaming kernels behind the
GEMM ops' small-M routes (fusedops/ops/gemm.py GEMV_MAX_M).

    gemv_linear(x, weight, bias=None, residual=None)  x @ W^T (+ bias) (+ residual), fp32, rounded once
    gemv_gate_up_silu(x, w_gate_up, block)            silu(x Wg^T) * (x Wu^T), prepare_gate_up layout

Both take 2-D x [M, K] (rows may be strided) and bf16 or fp16; K a multiple of 8, 16-byte aligned rows.
`problem(...)` says why a call cannot run here (the GEMM ops then use cuBLAS); the entry points raise
ValueError naming the argument instead. No workspace, no host sync: safe inside CUDA-graph capture.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, check_cuda, kernel, rows16_problem

SOURCE = register_source("gemv", "gemv.cu")

MAX_M = 16
ROWS_PER_CTA = 16  # outputs a CTA owns (one mma row tile; SwiGLU reads 16 gate + 16 up rows)
# (warps, 16-byte loads per W row per lane per step) compiled for each epilogue (csrc/gemv.cu); TUNING picks
# one per epilogue. 8 x 4 was fastest or tied on every decode shape at M = 1 / 8 / 16 (H100 run 2,
# perf/notes/gemv.md): 16 warps 1-10 % slower, 8 x 2 2-7 % slower, SwiGLU 4 x 4 4-5 % slower.
TUNINGS = {"linear": ((8, 2), (8, 4), (16, 2), (16, 4)), "swiglu": ((4, 4), (8, 2), (8, 4))}
TUNING = {"linear": (8, 4), "swiglu": (8, 4)}
DTYPES = (torch.bfloat16, torch.float16)
# The best tuning moves with memory bandwidth. On the H200 (1.4x the H100's) the sweep picked, per M tile
# (8: M <= 8, 16: M <= 16): linear 16 x 2 at M <= 8 (1-3 % faster), SwiGLU 8 x 2 at M <= 8 (6 %) and 4 x 4
# at M = 16 (7 %) (perf/results/bench_gemv_h200.md). Keyed on the device name; others use TUNING.
# Matched on the name's start ("NVIDIA H200", "NVIDIA H200 NVL"): a GH200 or a MIG slice has other bandwidth.
DEVICE_TUNING = {"NVIDIA H200": {("linear", 8): (16, 2), ("linear", 16): (8, 4), ("swiglu", 8): (8, 2),
                                 ("swiglu", 16): (4, 4)}}


@functools.lru_cache(maxsize=None)
def _device_table(device_index: int) -> Optional[dict]:
    name = torch.cuda.get_device_name(device_index)
    if "MIG" in name:
        return None
    return next((table for key, table in DEVICE_TUNING.items() if name.startswith(key)), None)


def default_tuning(kind: str, m: int, device: torch.device) -> tuple[int, int]:
    """The tuning a launch uses when none is given: the device's measured best, else TUNING."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    table = _device_table(index)
    return table[kind, 8 if m <= 8 else 16] if table else TUNING[kind]


class GemvParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("residual", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("x_row_stride", ctypes.c_int64), ("w_row_stride", ctypes.c_int64),
                ("residual_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
                ("block", ctypes.c_int64), ("prefetch", ctypes.c_int64)]


# 1: each warp pulls its first step of W toward L2 before it waits for the kernel ahead (csrc/gemv.cu). Off:
# the 32-layer bf16 decode step took 4.529 ms without it and 4.638 ms with it (H200, same process, 2026-12-03,
# perf/notes/gemv.md). A launch parameter so one process can measure both.
PREFETCH = 0


def kernel_name(kind: str, dtype: torch.dtype, m: int, tuning: Optional[tuple[int, int]] = None) -> str:
    warps, unroll = tuning or TUNING[kind]
    if (warps, unroll) not in TUNINGS[kind]:
        raise ValueError(f"tuning: {(warps, unroll)} is not compiled for {kind} (one of {TUNINGS[kind]})")
    return f"gemv_{kind}_{DTYPE_SUFFIX[dtype]}_m{8 if m <= 8 else 16}_w{warps}_u{unroll}"


def problem(x: torch.Tensor, weight: torch.Tensor, weight_name: str = "weight") -> Optional[str]:
    """Why x [M, K] @ weight [N, K]^T cannot run on the GEMV kernels, or None."""
    if x.dtype not in DTYPES:
        return f"x: dtype {x.dtype} is not supported by the GEMV (expected one of {list(DTYPES)})"
    if weight.dtype != x.dtype:
        return f"{weight_name}: dtype {weight.dtype} differs from x's dtype {x.dtype}"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"{weight_name}: shape {tuple(weight.shape)} does not fit x {tuple(x.shape)}"
    m, k = x.shape
    if not 0 < m <= MAX_M:
        return f"x: {m} rows; the GEMV takes 1 to {MAX_M}"
    if k % 8 or k == 0:
        return f"x: K = {k} must be a positive multiple of 8 (16-byte loads)"
    if weight.shape[0] == 0:
        return f"{weight_name}: N = 0 (nothing to launch)"
    if max(weight.shape[0], k) >= 1 << 31:
        return f"{weight_name}: shape {tuple(weight.shape)} exceeds 32-bit sizes"
    return rows16_problem("x", x) or rows16_problem(weight_name, weight)


def _epilogue_problem(n: int, m: int, x: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor]) -> Optional[str]:
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (n,) or bias.stride(0) != 1):
        return f"bias: expected a contiguous [{n}] {x.dtype} tensor, got {tuple(bias.shape)} {bias.dtype}"
    if residual is not None and (residual.dtype != x.dtype or residual.shape != (m, n) or residual.stride(-1) != 1):
        return (f"residual: expected [{m}, {n}] {x.dtype} rows with unit last stride, got "
                f"{tuple(residual.shape)} {residual.dtype} strides {residual.stride()}")
    return None


def linear_problem(x, weight, bias=None, residual=None) -> Optional[str]:
    return problem(x, weight) or _epilogue_problem(weight.shape[0], x.shape[0], x, bias, residual)


def gate_up_problem(x, w_gate_up, block: int) -> Optional[str]:
    two_i = w_gate_up.shape[0] if w_gate_up.dim() == 2 else 0
    if block <= 0 or block % ROWS_PER_CTA or two_i % (2 * block):
        return (f"block: {block} must be a positive multiple of {ROWS_PER_CTA} that tiles w_gate_up's "
                f"{two_i} rows in gate/up pairs")
    return problem(x, w_gate_up, "w_gate_up")


def _out(out: Optional[torch.Tensor], like: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if out is None:
        return like.new_empty(shape)
    if out.shape != shape or out.dtype != like.dtype or out.stride(-1) != 1:
        raise ValueError(f"out: expected [{shape[0]}, {shape[1]}] {like.dtype} rows with unit last stride, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out


def _launch(kind: str, x, weight, out, n: int, bias=None, residual=None, block: int = 0, tuning=None) -> None:
    for name, t in (("weight", weight), ("out", out), ("bias", bias), ("residual", residual)):
        if t is not None:
            check_cuda(name, t, x.device)
    m, k = x.shape
    params = GemvParams(out.data_ptr(), x.data_ptr(), weight.data_ptr(),
                        bias.data_ptr() if bias is not None else None,
                        residual.data_ptr() if residual is not None else None,
                        m, n, k, x.stride(0), weight.stride(0),
                        residual.stride(0) if residual is not None else 0, out.stride(0), block, PREFETCH)
    tuning = tuning or default_tuning(kind, m, x.device)
    name = kernel_name(kind, x.dtype, m, tuning)
    warps = tuning[0]
    kernel(SOURCE, name, GemvParams, x.device).launch((-(-n // ROWS_PER_CTA),), (32 * warps,), params)


def gemv_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                tuning: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N]; with residual: round(residual + x W^T + bias)."""
    why = linear_problem(x, weight, bias, residual)
    if why:
        raise ValueError(why)
    check_cuda("x", x)
    n = weight.shape[0]
    out = _out(out, x, (x.shape[0], n))
    _launch("linear", x, weight, out, n, bias=bias, residual=residual, tuning=tuning)
    return out


def gemv_gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, block: int, out: Optional[torch.Tensor] = None,
                      tuning: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) [M, I] from prepare_gate_up(w_gate, w_up, block), block a multiple of 16."""
    why = gate_up_problem(x, w_gate_up, block)
    if why:
        raise ValueError(why)
    check_cuda("x", x)
    inter = w_gate_up.shape[0] // 2
    out = _out(out, x, (x.shape[0], inter))
    _launch("swiglu", x, w_gate_up, out, inter, block=block, tuning=tuning)
    return out
