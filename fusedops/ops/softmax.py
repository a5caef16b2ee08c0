"""fusedops::softmax — softmax over the last dim (csrc/softmax.cu), fp32 statistics.

Non-contiguous input: rows may be strided; a non-unit last stride is copied."""
from __future__ import annotations

import ctypes

import torch

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, aligned16, check_cuda, check_dtype, kernel, rows_view

SOURCE = register_source("softmax", "softmax.cu")

WARP_ITEMS = (1, 2, 4)         # w-variants: rows of up to 4 x 32 vectors, one warp each
WARP_ROWS_PER_CTA = 4          # kWarpRowsPerCta in csrc/softmax.cu
CACHED_ITEMS = (1, 2, 4, 8)    # c-variants: up to 8 x 512 vectors in registers
CACHED_THREADS = 512           # kCachedThreads


class SoftmaxParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("x_row_stride", ctypes.c_int64),
                ("out_row_stride", ctypes.c_int64)]


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """torch.softmax over the last dim: fp32 inside, one rounding to x's dtype."""
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def _validate(x: torch.Tensor) -> None:
    check_dtype("x", x)
    if x.dim() == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")


def variant(cols: int, vec: int, vector_ok: bool) -> tuple[str, int, int]:
    """(kernel suffix, threads per CTA, rows per CTA)."""
    if not vector_ok:
        return "o1", min(1024, max(32, (cols + 31) // 32 * 32)), 1
    nvec = cols // vec
    items = next((i for i in WARP_ITEMS if nvec <= 32 * i), None)
    if items is not None:
        return f"w{items}", 32 * WARP_ROWS_PER_CTA, WARP_ROWS_PER_CTA
    items = next((i for i in CACHED_ITEMS if nvec <= i * CACHED_THREADS), None)
    if items is not None:
        return f"c{items}", (-(-nvec // items) + 31) // 32 * 32, 1
    return "o", 1024, 1


def launch(x2: torch.Tensor, out2: torch.Tensor, force: str | None = None) -> None:
    rows, cols = x2.shape
    vec = 16 // x2.element_size()
    vector_ok = cols % vec == 0 and x2.stride(0) % vec == 0 and out2.stride(0) % vec == 0 and aligned16(x2, out2)
    name, threads, rows_per_cta = variant(cols, vec, vector_ok)
    if force == "online":  # benchmark / test hook: the long-row kernel on any row
        name, threads, rows_per_cta = ("o" if vector_ok else "o1"), 1024, 1
    params = SoftmaxParams(out2.data_ptr(), x2.data_ptr(), rows, cols, x2.stride(0), out2.stride(0))
    k = kernel(SOURCE, f"softmax_{DTYPE_SUFFIX[x2.dtype]}_{name}", SoftmaxParams, x2.device)
    k.launch((-(-rows // rows_per_cta),), (threads,), params)


@torch.library.custom_op("fusedops::softmax", mutates_args=(), device_types="cpu")
def softmax(x: torch.Tensor) -> torch.Tensor:
    _validate(x)
    return softmax_reference(x).contiguous()


@softmax.register_fake
def _(x):
    _validate(x)
    return x.new_empty(x.shape)


@softmax.register_kernel("cuda")
def _(x):
    _validate(x)
    check_cuda("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        launch(rows_view("x", x), out.view(-1, x.shape[-1]))
    return out
