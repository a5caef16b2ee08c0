"""fusedops::attention — SDPA semantics over GQA-native k/v (no repeat_kv), optionally restricted to
the first kv_len[b] keys of a static cache.

    q [B, Hq, S, D], k/v [B, Hkv, Skv, D] with Hq % Hkv == 0
    attn_mask: None or bool, broadcastable to [B, Hq, S, Skv]; True = attend (SDPA's convention)
    is_causal: query i sees key j <= i + (L - S), L = kv_len[b] if given else Skv (diagonal aligned
               to the end of the valid keys: chunked prefill / decode on top of a cache)
    kv_len:    None or int [B] (or [1]) on the device: keys j >= kv_len[b] are ignored. Read on the
               device, so a captured CUDA graph serves every step of a growing cache.
A query row with no visible key returns zeros (SDPA would return NaN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._launch import check_dtype, check_same_dtype

ATTENTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def attention_reference(q, k, v, attn_mask=None, scale=None, is_causal=False, kv_len=None):
    """fp32 math, any device. Shapes and semantics as in the module docstring."""
    b, hq, s, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rep = hq // hkv
    qf = q.float().view(b, hkv, rep, s, d)
    scores = torch.einsum("bgrsd,bgtd->bgrst", qf, k.float()) * scale       # [B, Hkv, rep, S, Skv]
    visible = torch.ones((b, 1, 1, s, skv), dtype=torch.bool, device=q.device)
    keys = torch.arange(skv, device=q.device)
    length = (kv_len.view(-1).long().expand(b) if kv_len is not None
              else torch.full((b,), skv, device=q.device, dtype=torch.long))
    visible &= (keys.view(1, skv) < length.view(b, 1)).view(b, 1, 1, 1, skv)
    if is_causal:
        limit = torch.arange(s, device=q.device).view(1, s, 1) + (length - s).view(b, 1, 1)
        visible &= (keys.view(1, 1, skv) <= limit).view(b, 1, 1, s, skv)
    if attn_mask is not None:
        m = attn_mask.expand(b, hq, s, skv).reshape(b, hkv, rep, s, skv)
        visible = visible & m
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    out = torch.einsum("bgrst,bgtd->bgrsd", probs, v.float())
    return out.reshape(b, hq, s, d).to(q.dtype)


def _validate(q, k, v, attn_mask, scale, is_causal, kv_len):
    check_dtype("q", q, ATTENTION_DTYPES)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v: shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"k: {k.shape[1]} kv heads do not divide q's {hq} heads")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask: only boolean masks are supported, got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, hq, s, k.shape[2]))
        except RuntimeError as exc:
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(b, hq, s, k.shape[2])}") from exc
    if kv_len is not None and (kv_len.dim() != 1 or kv_len.shape[0] not in (1, b)
                               or kv_len.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"kv_len: expected int32/int64 [B] or [1], got {kv_len.dtype} {tuple(kv_len.shape)}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0, got {scale}")


@torch.library.custom_op("fusedops::attention", mutates_args=(), device_types="cpu")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, is_causal: bool = False,
              kv_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    _validate(q, k, v, attn_mask, scale, is_causal, kv_len)
    return attention_reference(q, k, v, attn_mask, scale, is_causal, kv_len).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask=None, scale=None, is_causal=False, kv_len=None):
    _validate(q, k, v, attn_mask, scale, is_causal, kv_len)
    return q.new_empty(q.shape)
