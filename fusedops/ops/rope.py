"""fusedops::rope (rotary embedding on q and k in one op) and fusedops::rope_cache_write (the same,
also writing the rotated k and v into a static KV cache at cache_position), csrc/rope.cu.

Non-contiguous q / k / v (HF's `view(B, S, H, D).transpose(1, 2)`) are read through their strides;
outputs are contiguous [B, H, S, D]. A non-unit last stride is copied first. The caches must have a
unit last stride (they are written in place). In the kernel, cache_position is read on the device
(CUDA-graph safe); positions outside [0, L) are skipped, where index_copy_ would raise.
cos/sin are in q's dtype or fp32 (HF's values before their cast, which the backend passes: one rounding
fewer); the arithmetic is fp32, rounded once to q's dtype."""
from __future__ import annotations

import ctypes

import torch

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, aligned16, check_cuda, check_dtype, check_same_dtype, kernel

SOURCE = register_source("rope", "rope.cu")
THREADS = 512  # kRopeThreads in csrc/rope.cu

_I64x3 = ctypes.c_int64 * 3


class RopeParams(ctypes.Structure):
    _fields_ = [("q_out", ctypes.c_void_p), ("k_out", ctypes.c_void_p), ("v_out", ctypes.c_void_p),
                ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("positions", ctypes.c_void_p),
                ("seq", ctypes.c_int64), ("q_heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("cache_len", ctypes.c_int64),
                ("q_stride", _I64x3), ("k_stride", _I64x3), ("v_stride", _I64x3),
                ("q_out_stride", _I64x3), ("k_out_stride", _I64x3), ("v_out_stride", _I64x3),
                ("cs_stride", ctypes.c_int64 * 2), ("positions_int64", ctypes.c_int32)]


def rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """HF rotate_half (halves) or the GPT-J convention (adjacent pairs)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, interleaved=False):
    """HF apply_rotary_pos_emb with unsqueeze_dim=1, computed in fp32 and rounded once to the model
    dtype (the kernel's rounding; eager rounds after every op)."""
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()

    def apply(x):
        return (x.float() * cos + rotate(x.float(), interleaved) * sin).to(x.dtype)
    return apply(q), apply(k)


def _validate(q, k, cos, sin):
    check_dtype("q", q)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("sin", sin, "cos", cos)
    if sin.shape != cos.shape:   # the kernel walks both with cos's batch stride
        raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos's {tuple(cos.shape)}")
    if cos.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"cos: dtype {cos.dtype} must be q's ({q.dtype}) or torch.float32 (HF's cos/sin "
                         f"before their cast: read as is, they skip one rounding)")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k: expected [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k: shape {tuple(k.shape)} does not fit q's {tuple(q.shape)}")
    if d % 2:
        raise ValueError(f"q: head_dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s or t.shape[2] != d:
            raise ValueError(f"{name}: expected [B or 1, S, D] = [{b}, {s}, {d}], got {tuple(t.shape)}")


@torch.library.custom_op("fusedops::rope", mutates_args=(), device_types="cpu")
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(q, k, cos, sin)
    qo, ko = rope_reference(q, k, cos, sin, interleaved)
    return qo.contiguous(), ko.contiguous()


@rope.register_fake
def _(q, k, cos, sin, interleaved=False):
    _validate(q, k, cos, sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _validate_cache(q, k, v, cos, sin, k_cache, v_cache, cache_position):
    _validate(q, k, cos, sin)
    check_same_dtype("v", v, "q", q)
    check_same_dtype("k_cache", k_cache, "q", q)
    check_same_dtype("v_cache", v_cache, "q", q)
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    b, hkv, s, d = k.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[0] != b or c.shape[1] != hkv or c.shape[3] != d:
            raise ValueError(f"{name}: expected [{b}, {hkv}, L, {d}], got {tuple(c.shape)}")
    if cache_position.dim() != 1 or cache_position.shape[0] != s or cache_position.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"cache_position: expected int32/int64 [S={s}], got {cache_position.dtype} "
                         f"{tuple(cache_position.shape)}")


@torch.library.custom_op("fusedops::rope_cache_write", mutates_args=("k_cache", "v_cache"),
                         device_types="cpu")
def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_position: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Returns rotated q; writes rotated k and v into the caches at cache_position (dim 2), as
    HF StaticLayer.update's index_copy_ does."""
    _validate_cache(q, k, v, cos, sin, k_cache, v_cache, cache_position)
    qo, ko = rope_reference(q, k, cos, sin, interleaved)
    k_cache.index_copy_(2, cache_position, ko)
    v_cache.index_copy_(2, cache_position, v)
    return qo.contiguous()


@rope_cache_write.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, cache_position, interleaved=False):
    _validate_cache(q, k, v, cos, sin, k_cache, v_cache, cache_position)
    return q.new_empty(q.shape)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _launch(q, k, v, cos, sin, q_out, k_out, v_out, positions, interleaved: bool) -> None:
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    v = _unit_last(v) if v is not None else None
    vec = 16 // q.element_size()
    tensors = [t for t in (q, k, v, q_out, k_out, v_out) if t is not None]
    strides = [st for t in tensors for st in t.stride()[:3]] + [cos.stride(0), cos.stride(1)]
    vector_ok = d % (2 * vec) == 0 and all(st % vec == 0 for st in strides) and aligned16(
        *tensors, cos, sin)
    chunks = d // (2 * vec) if vector_ok else d // 2
    heads = hq + hkv * (2 if v_out is not None else 1)
    threads = min(THREADS, (heads * chunks + 31) // 32 * 32)
    none3 = (0, 0, 0)
    params = RopeParams(
        q_out.data_ptr(), k_out.data_ptr(), v_out.data_ptr() if v_out is not None else None,
        q.data_ptr(), k.data_ptr(), v.data_ptr() if v is not None else None,
        cos.data_ptr(), sin.data_ptr(), positions.data_ptr() if positions is not None else None,
        s, hq, hkv, d, k_out.shape[2],
        _I64x3(*q.stride()[:3]), _I64x3(*k.stride()[:3]),
        _I64x3(*(v.stride()[:3] if v is not None else none3)),
        _I64x3(*q_out.stride()[:3]), _I64x3(*k_out.stride()[:3]),
        _I64x3(*(v_out.stride()[:3] if v_out is not None else none3)),
        (ctypes.c_int64 * 2)(0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1)),
        int(positions is not None and positions.dtype == torch.int64))
    cs = "_c32" if cos.dtype != q.dtype else ""
    name = f"rope_{DTYPE_SUFFIX[q.dtype]}{cs}_{'inter' if interleaved else 'half'}_{'v' if vector_ok else 's'}"
    kernel(SOURCE, name, RopeParams, q.device).launch((b * s,), (threads,), params)


@rope.register_kernel("cuda")
def _(q, k, cos, sin, interleaved=False):
    _validate(q, k, cos, sin)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_cuda(name, t, q.device)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device)
    if q.numel():
        _launch(q, k, None, cos, sin, q_out, k_out, None, None, interleaved)
    return q_out, k_out


@rope_cache_write.register_kernel("cuda")
def _(q, k, v, cos, sin, k_cache, v_cache, cache_position, interleaved=False):
    _validate_cache(q, k, v, cos, sin, k_cache, v_cache, cache_position)
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache),
                    ("v_cache", v_cache), ("cache_position", cache_position)):
        check_cuda(name, t, q.device)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must have stride 1 (written in place), got "
                             f"strides {c.stride()}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel():
        _launch(q, k, v, cos, sin, q_out, k_cache, v_cache, cache_position.contiguous(), interleaved)
    return q_out
