"""Helpers shared by every op: argument checks that raise ValueError naming the argument, and the
mapping from a torch dtype to the kernel-name suffix used in csrc/."""
from __future__ import annotations

from typing import Optional

import torch

from ..runtime import registry

DTYPE_SUFFIX = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_DTYPES = tuple(DTYPE_SUFFIX)


def check_dtype(name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported (expected one of {list(allowed)})")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} differs from {ref_name}'s dtype {ref.dtype}")


def check_cuda(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    if not t.is_cuda:
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the other inputs are on {device}")


def aligned16(*tensors: torch.Tensor) -> bool:
    ptrs = 0
    for t in tensors:  # one OR per pointer: this runs on every eager call
        ptrs |= t.data_ptr()
    return ptrs % 16 == 0


def rows_view(name: str, x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit last stride; rows may be strided (no copy when possible)."""
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least 1 dimension, got a scalar")
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1 and x2.shape[-1] > 1:
        x2 = x2.contiguous()
    return x2


def kernel(source, function: str, params_type: type, device: torch.device):
    return registry.get_kernel(source, function, params_type, device)


def rows16_problem(name: str, t: torch.Tensor) -> Optional[str]:
    """Why t cannot be read as [rows, K] in 16-byte pieces (unit last stride, 16-byte aligned rows of a
    16-bit dtype; K itself is checked by the caller), or None."""
    if t.dim() != 2 or t.stride(-1) != 1:
        return f"{name}: expected a 2-D tensor with unit last stride, got shape {tuple(t.shape)} strides {t.stride()}"
    if t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % 8):
        return (f"{name}: rows must start on 16-byte boundaries (pointer {t.data_ptr():#x}, "
                f"row stride {t.stride(0)} elements)")
    return None


def broadcasts_to(shape, target) -> bool:
    """shape expands to exactly target (no more dims, every dim 1 or equal): a mask that would enlarge
    the result is an error, not a broadcast."""
    return len(shape) <= len(target) and all(a in (1, t) for a, t in zip(reversed(shape), reversed(target)))
