"""fusedops::rope (rotary embedding on q and k in one op) and fusedops::rope_cache_write (the same,
also writing the rotated k and v into a static KV cache at cache_position)."""
from __future__ import annotations

import torch

from ._launch import check_dtype, check_same_dtype


def rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """HF rotate_half (halves) or the GPT-J convention (adjacent pairs)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin, interleaved=False):
    """HF apply_rotary_pos_emb with unsqueeze_dim=1, op for op in the model dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate(q, interleaved) * sin, k * cos + rotate(k, interleaved) * sin


def _validate(q, k, cos, sin):
    check_dtype("q", q)
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        check_same_dtype(name, t, "q", q)
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
