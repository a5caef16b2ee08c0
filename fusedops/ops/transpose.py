"""fusedops::transpose — x.transpose(-2, -1).contiguous() for x of 2 or more dims (csrc/transpose.cu).

Leading dims are flattened into one batch dim (a copy when they cannot be viewed so); rows may be
strided; a non-unit last stride is copied first."""
from __future__ import annotations

import ctypes

import torch

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, check_cuda, check_dtype, kernel

SOURCE = register_source("transpose", "transpose.cu")
MAX_GRID_Z = 65535  # CUDA's gridDim.z limit; more batches are walked grid-stride


class TransposeParams(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("x", ctypes.c_void_p), ("batch", ctypes.c_int64),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("x_batch_stride", ctypes.c_int64), ("x_row_stride", ctypes.c_int64)]


def transpose_reference(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1).contiguous()


def _validate(x: torch.Tensor) -> None:
    check_dtype("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dimensions, got shape {tuple(x.shape)}")


def launch(x3: torch.Tensor, out: torch.Tensor) -> None:
    """x3: [B, M, N] with unit last stride; out: contiguous, B * N * M elements."""
    batch, m, n = x3.shape
    per_word = 4 // x3.element_size()
    tile = 32 * per_word
    wide = (m % per_word == 0 and n % per_word == 0 and x3.stride(0) % per_word == 0
            and x3.stride(1) % per_word == 0 and x3.data_ptr() % 4 == 0 and out.data_ptr() % 4 == 0)
    params = TransposeParams(out.data_ptr(), x3.data_ptr(), batch, m, n, x3.stride(0), x3.stride(1))
    k = kernel(SOURCE, f"transpose_{DTYPE_SUFFIX[x3.dtype]}_{'wide' if wide else 'narrow'}", TransposeParams,
               x3.device)
    k.launch((-(-n // tile), -(-m // tile), min(batch, MAX_GRID_Z)), (32, 8), params)


@torch.library.custom_op("fusedops::transpose", mutates_args=(), device_types="cpu")
def transpose(x: torch.Tensor) -> torch.Tensor:
    _validate(x)
    return transpose_reference(x)


@transpose.register_fake
def _(x):
    _validate(x)
    return x.new_empty((*x.shape[:-2], x.shape[-1], x.shape[-2]))


@transpose.register_kernel("cuda")
def _(x):
    _validate(x)
    check_cuda("x", x)
    out = torch.empty((*x.shape[:-2], x.shape[-1], x.shape[-2]), dtype=x.dtype, device=x.device)
    if x.numel():
        x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
        if x3.stride(-1) != 1 and x3.shape[-1] > 1:
            x3 = x3.contiguous()
        launch(x3, out)
    return out
