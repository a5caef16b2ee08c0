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
# A row takes the cached variant with the fewest vectors a thread (the most threads) that holds it. H100,
# 2026-11-25: [16384 x 4096] c1 110.5 us = c2 110.9 < c4 140.2; x8192 c2 248.5 < c4 301.6; a warp per row
# for x768 lost (27.8 us vs c1's 21.4: 122 registers a thread, 16 warps an SM).


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


def plan(hidden: int, vec: int, vector_ok: bool, variant: str | None = None) -> tuple[str, int]:
    """(kernel suffix, threads per CTA). `variant` ("c1", "c2", "c4") forces a cached variant for
    benchmark sweeps; it must hold the row in CACHED_THREADS threads."""
    nvec = hidden // vec if vector_ok else hidden
    if variant is None and vector_ok:
        items = next((i for i in CACHED_ITEMS if nvec <= i * CACHED_THREADS), None)
        variant = f"c{items}" if items is not None else None
    if variant is not None:
        threads = max(32, (-(-nvec // int(variant[1:])) + 31) // 32 * 32)
        if not vector_ok or threads > CACHED_THREADS:
            raise ValueError(f"variant: {variant} cannot hold a row of hidden={hidden} in {CACHED_THREADS} "
                             f"threads with 16-byte vectors")
        return variant, threads
    return ("sv" if vector_ok else "s1"), min(1024, (nvec + 31) // 32 * 32)


def launch(x2, weight, bias, out2, eps, variant: str | None = None) -> None:
    rows, hidden = x2.shape
    vec = 16 // x2.element_size()
    affine = [t for t in (weight, bias) if t is not None]
    vector_ok = (hidden % vec == 0 and x2.stride(0) % vec == 0 and out2.stride(0) % vec == 0
                 and aligned16(x2, out2, *affine))
    name, threads = plan(hidden, vec, vector_ok, variant)
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
