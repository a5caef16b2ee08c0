"""fusedops::rms_norm — RMSNorm forward with LlamaRMSNorm's exact rounding (csrc/rmsnorm.cu).

Non-contiguous input: rows may be strided (any row stride); a non-unit last stride is copied."""
from __future__ import annotations

import ctypes
import functools

import torch

from ..runtime import register_source
from ._launch import (DTYPE_SUFFIX, aligned16, check_cuda, check_dtype, check_same_dtype, kernel,
                      rows_view)

SOURCE = register_source("rmsnorm", "rmsnorm.cu")

# Most threads per row for each cached kernel (kCachedThreadsC1 / kCachedThreads in csrc/rmsnorm.cuh);
# rows longer than 4 x 512 vectors stream.
CACHED_THREADS = {1: 1024, 2: 512, 4: 512}
CACHED_ITEMS = (1, 2, 4)  # c8 spilled registers (ptxas, sm_90a): longer rows stream
# Vectors a thread starts at. H100 sweep, 2026-11-25 (perf/notes/memkernels.md): [16384 x 4096] c1 at 512
# threads 94.0 us (99 % of copy) vs c2 at 256 98.8; add+RMSNorm c1 180.9 vs c2 182.6. At x8192 (c2 at 512
# threads, 48 registers: 2 CTAs an SM) RMSNorm reaches only 81 %; c1 (30 registers) fills the SM.
PREFERRED_ITEMS = 1


class RmsNormParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("weight", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("x_row_stride", ctypes.c_int64), ("out_row_stride", ctypes.c_int64),
                ("eps", ctypes.c_float)]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm.forward in fp32, rounded once at the end (eager also rounds before the weight)."""
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    return (weight.float() * (h * torch.rsqrt(var + eps))).to(x.dtype)


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_dtype("x", x)
    check_same_dtype("weight", weight, "x", x)
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match x's last dim "
                         f"({tuple(x.shape)})")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")


@functools.lru_cache(maxsize=None)  # pure, and on every eager call's CPU path
def row_variant(hidden: int, vec: int, vector_ok: bool, items: int | None = None) -> tuple[str, int]:
    """(kernel suffix, threads per CTA) for a one-row-per-CTA norm kernel of csrc/rmsnorm.cuh.
    `items` forces a cached variant (benchmark sweeps); it must fit in CACHED_THREADS threads."""
    nvec = hidden // vec if vector_ok else hidden
    if vector_ok and items is None:
        items = 1 if nvec <= 32 * PREFERRED_ITEMS else next(
            (i for i in CACHED_ITEMS if i >= PREFERRED_ITEMS and nvec <= i * CACHED_THREADS[i]), None)
    if vector_ok and items is not None:
        threads = max(32, (-(-nvec // items) + 31) // 32 * 32)
        if threads > CACHED_THREADS[items]:
            raise ValueError(f"items: {items} vectors a thread need {threads} threads for hidden={hidden}, "
                             f"more than {CACHED_THREADS[items]}")
        return f"c{items}", threads
    return ("sv" if vector_ok else "s1"), min(1024, (nvec + 31) // 32 * 32)


def vector_friendly(hidden: int, vec: int, rows: tuple[torch.Tensor, ...], weight: torch.Tensor) -> bool:
    """16-byte vectors fit: the hidden size and every row stride are whole vectors, every pointer is
    16-byte aligned. (The weight is one contiguous row: only its alignment matters.)"""
    return (hidden % vec == 0 and all(t.stride(0) % vec == 0 for t in rows if t.shape[0] > 1)
            and aligned16(*rows, weight))


def kernel_plan(x2: torch.Tensor, weight: torch.Tensor, out2: torch.Tensor,
                items: int | None = None) -> tuple[str, int]:
    """(kernel name, threads per CTA) for these tensors."""
    vec = 16 // x2.element_size()
    variant, threads = row_variant(x2.shape[1], vec, vector_friendly(x2.shape[1], vec, (x2, out2), weight), items)
    return f"rmsnorm_{DTYPE_SUFFIX[x2.dtype]}_{variant}", threads


def launch(x2: torch.Tensor, weight: torch.Tensor, out2: torch.Tensor, eps: float,
           items: int | None = None) -> None:
    rows, hidden = x2.shape
    name, threads = kernel_plan(x2, weight, out2, items)
    params = RmsNormParams(out2.data_ptr(), x2.data_ptr(), weight.data_ptr(), rows, hidden,
                           x2.stride(0), out2.stride(0), float(eps))
    kernel(SOURCE, name, RmsNormParams, x2.device).launch((rows,), (threads,), params)


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
    launch(rows_view("x", x), weight.contiguous(), out.view(-1, x.shape[-1]), eps)
    return out
