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
WARP_ITEMS = (1, 2, 4, 8)  # w<ITEMS>: one warp per row for rows of up to 8 x 32 vectors
# One CTA per row took 0.77x Inductor at [16384x768] (96 threads, two barriers a row) and 0.73x at x8192
# (c2 at 512 threads), 2026-11-25. Not yet measured: warp rows for short rows, and starting at 2 vectors
# a thread (Inductor's/Liger's shape, as in rmsnorm.PREFERRED_ITEMS); bench_layernorm.py sweeps both.
PREFERRED_ITEMS = 2
ROWS_PER_CTA = 4  # warps (rows) per w<ITEMS> CTA; at most kWarpRowThreads / 32


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


def plan(hidden: int, vec: int, vector_ok: bool, variant: str | None = None) -> tuple[str, int, int]:
    """(kernel suffix, threads per CTA, rows per CTA). `variant` ("w4", "c2", ...) forces one for
    benchmark sweeps; it must hold the row."""
    nvec = hidden // vec if vector_ok else hidden
    if variant is None and vector_ok:
        w = next((i for i in WARP_ITEMS if nvec <= 32 * i), None)
        c = next((i for i in CACHED_ITEMS if i >= PREFERRED_ITEMS and nvec <= i * CACHED_THREADS),
                 next((i for i in CACHED_ITEMS if nvec <= i * CACHED_THREADS), None))
        variant = f"w{w}" if w is not None else f"c{c}" if c is not None else None
    if variant is not None and variant[0] in "wc":
        items = int(variant[1:])
        if not vector_ok or variant[0] == "w" and nvec > 32 * items:
            raise ValueError(f"variant: {variant} cannot hold a row of hidden={hidden}")
        if variant[0] == "w":
            return variant, 32 * ROWS_PER_CTA, ROWS_PER_CTA
        threads = max(32, (-(-nvec // items) + 31) // 32 * 32)
        if threads > CACHED_THREADS:
            raise ValueError(f"variant: {variant} needs {threads} threads for hidden={hidden}, "
                             f"more than {CACHED_THREADS}")
        return variant, threads, 1
    return ("sv" if vector_ok else "s1"), min(1024, (nvec + 31) // 32 * 32), 1


def launch(x2, weight, bias, out2, eps, variant: str | None = None) -> None:
    rows, hidden = x2.shape
    vec = 16 // x2.element_size()
    affine = [t for t in (weight, bias) if t is not None]
    vector_ok = (hidden % vec == 0 and x2.stride(0) % vec == 0 and out2.stride(0) % vec == 0
                 and aligned16(x2, out2, *affine))
    name, threads, rows_per_cta = plan(hidden, vec, vector_ok, variant)
    params = LayerNormParams(out2.data_ptr(), x2.data_ptr(), weight.data_ptr() if weight is not None else None,
                             bias.data_ptr() if bias is not None else None, rows, hidden, x2.stride(0),
                             out2.stride(0), float(eps))
    k = kernel(SOURCE, f"layernorm_{DTYPE_SUFFIX[x2.dtype]}_{name}", LayerNormParams, x2.device)
    k.launch((-(-rows // rows_per_cta),), (threads,), params)


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
