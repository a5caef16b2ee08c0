"""fusedops::silu_mul (silu(g) * u) and fusedops::silu_mul_cat (the same on one [..., 2I] tensor),
csrc/silu_mul.cu. Non-contiguous inputs: silu_mul copies them; silu_mul_cat reads strided rows."""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, aligned16, check_cuda, check_dtype, check_same_dtype, kernel, rows_view

SOURCE = register_source("silu_mul", "silu_mul.cu")
THREADS = 256      # per CTA along a row: [8192x14336] at the copy ceiling (102 % of copy, 2026-11-25)
# Calls with fewer vectors than this take DECODE_THREADS-thread CTAs, spreading a decode-size call over
# more SMs (at 256 threads one 14336-wide row fills 7 CTAs). H100 graph replay, [1/4/16 x 14336]:
# 128 threads 1.5/1.6/1.8 us, 64 and 256 threads 1.6/1.7/1.8 (2026-11-25): a small effect.
DECODE_VECTORS = 132 * THREADS
DECODE_THREADS = 128
MAX_GRID_Y = 65535  # CUDA's gridDim.y limit; more rows are walked grid-stride


class SiluMulParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("g", ctypes.c_void_p), ("u", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("g_row_stride", ctypes.c_int64), ("u_row_stride", ctypes.c_int64),
                ("out_row_stride", ctypes.c_int64)]


def silu_mul_reference(g, u):
    """HF LlamaMLP's act_fn(gate_proj(x)) * up_proj(x) in fp32, rounded once to the model dtype."""
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def _validate(g, u):
    check_dtype("g", g)
    check_same_dtype("u", u, "g", g)
    if g.shape != u.shape:
        raise ValueError(f"u: shape {tuple(u.shape)} differs from g's {tuple(g.shape)}")


@torch.library.custom_op("fusedops::silu_mul", mutates_args=(), device_types="cpu")
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _validate(g, u)
    return silu_mul_reference(g, u).contiguous()


@silu_mul.register_fake
def _(g, u):
    _validate(g, u)
    return g.new_empty(g.shape)


def _validate_cat(gu):
    check_dtype("gu", gu)
    if gu.dim() == 0 or gu.shape[-1] % 2:
        raise ValueError(f"gu: last dim must be even ([..., 2*I]), got shape {tuple(gu.shape)}")


@torch.library.custom_op("fusedops::silu_mul_cat", mutates_args=(), device_types="cpu")
def silu_mul_cat(gu: torch.Tensor) -> torch.Tensor:
    _validate_cat(gu)
    g, u = gu.chunk(2, dim=-1)
    return silu_mul_reference(g, u).contiguous()


@silu_mul_cat.register_fake
def _(gu):
    _validate_cat(gu)
    return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))


def vector_ok(g2: torch.Tensor, u2: torch.Tensor, out2: torch.Tensor) -> bool:
    """16-byte vectors fit: row strides are whole vectors (moot for one row: the kernel ends each row
    with a scalar tail) and the pointers are 16-byte aligned."""
    vec = 16 // out2.element_size()
    strides_ok = out2.shape[0] == 1 or all(t.stride(0) % vec == 0 for t in (g2, u2, out2))
    return strides_ok and aligned16(g2, u2, out2)


def launch(g2: torch.Tensor, u2: torch.Tensor, out2: torch.Tensor, threads: int | None = None) -> None:
    """g2, u2, out2: [rows, cols] views with unit column stride. `threads` per CTA overrides the
    size-based choice (benchmark sweeps)."""
    rows, cols = out2.shape
    vec = 16 // out2.element_size()
    wide = vector_ok(g2, u2, out2)
    per_row = -(-cols // vec) if wide else cols
    if threads is None:
        threads = DECODE_THREADS if rows * per_row < DECODE_VECTORS else THREADS
    params = SiluMulParams(out2.data_ptr(), g2.data_ptr(), u2.data_ptr(), rows, cols,
                           g2.stride(0), u2.stride(0), out2.stride(0))
    k = kernel(SOURCE, f"silu_mul_{DTYPE_SUFFIX[out2.dtype]}_{'v' if wide else 's'}",
               SiluMulParams, out2.device)
    k.launch((-(-per_row // threads), min(rows, MAX_GRID_Y)), (threads,), params)


@silu_mul.register_kernel("cuda")
def _(g, u):
    _validate(g, u)
    check_cuda("g", g)
    check_cuda("u", u, g.device)
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if g.numel():
        launch(g.contiguous().view(1, -1), u.contiguous().view(1, -1), out.view(1, -1))
    return out


@silu_mul_cat.register_kernel("cuda")
def _(gu):
    _validate_cat(gu)
    check_cuda("gu", gu)
    i = gu.shape[-1] // 2
    out = torch.empty((*gu.shape[:-1], i), dtype=gu.dtype, device=gu.device)
    if out.numel():
        gu2 = rows_view("gu", gu)
        launch(gu2[:, :i], gu2[:, i:], out.view(-1, i))
    return out
