"""Decode attention over a static KV cache (csrc/attention_decode.cu): split-KV flash-decoding for
1-8 new tokens per sequence, GQA-native (each K/V byte read once per step for all the q heads of its kv
head), valid lengths read on the device from kv_len so that one captured CUDA graph serves every step.

Semantics are those of fusedops::attention (fusedops/ops/attention.py), which calls
`decode_attention_cuda` for short q; `supports_decode` says ahead of time whether it can.
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional

import torch

from ..runtime import register_source
from ..runtime.driver import check
from ._launch import DTYPE_SUFFIX, aligned16, broadcasts_to, kernel

SOURCE = register_source("attention_decode", "attention_decode.cu")

MAX_NEW_TOKENS = 8
# head_dim -> most query rows (group * S) per kv head: 16 per m-tile, one m-tile per 4 warps;
# D=256 has one m-tile (253 registers already, ptxas -v, 2026-11-25).
MAX_ROWS = {64: 32, 128: 32, 256: 16}
TILE_KEYS = 64        # kTileKeys in csrc/attention_decode_params.cuh
MAX_SPLITS = 128      # kMaxSplits in csrc/attention_decode.cu
COMBINE_WARPS = 4     # kCombineWarps, one query row per warp
# Smallest split count whose last wave is at least this full, relative to the best count: extra splits
# only add combine work once the SMs are busy.
WAVE_FILL = 0.95


class DecodeParams(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("o_partial", ctypes.c_void_p), ("lse_partial", ctypes.c_void_p),
                ("kv_len", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("semaphores", ctypes.c_void_p),
                *[(f"{t}_stride_{d}", ctypes.c_int64) for t in "qkvo" for d in ("b", "h", "s" if t in "qo" else "l")],
                *[(f"mask_stride_{d}", ctypes.c_int64) for d in "bhsl"],
                ("kv_len_stride", ctypes.c_int64),
                ("kv_len_is_int64", ctypes.c_int32), ("heads_kv", ctypes.c_int32), ("seq_q", ctypes.c_int32),
                ("group", ctypes.c_int32), ("rows", ctypes.c_int32), ("cache_len", ctypes.c_int32),
                ("num_splits", ctypes.c_int32), ("is_causal", ctypes.c_int32), ("scale_log2", ctypes.c_float)]


# Merge the splits in the split kernel (its last CTA per (batch, kv head)) instead of a second kernel;
# compiled for these head dims (D = 256 has no registers left for it).
MERGE_IN_SPLIT_KERNEL = True
MERGES_IN_SPLIT_KERNEL = (64, 128)
_SEMAPHORES: dict[int, torch.Tensor] = {}    # device index -> int32 arrival counters, zero between launches
_RETIRED: list[torch.Tensor] = []            # outgrown counters: captured graphs still hold their address


def semaphores(device: torch.device, count: int) -> Optional[torch.Tensor]:
    """At least `count` zeroed arrival counters on `device`, shared by every decode launch there (each
    launch leaves them zero, and launches on one stream run one after another), or None while a CUDA graph
    is being captured and none are allocated yet: the caller then merges in the combine kernel, since memory
    allocated during capture belongs to that graph. Two decode launches running at once on two streams of
    one device would share counters: like the backend's graphs (one capture pool a device), they must not."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _SEMAPHORES.get(index)
    if buf is not None and buf.numel() >= count:
        return buf
    if torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _RETIRED.append(buf)
    _SEMAPHORES[index] = buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=torch.device("cuda", index))
    return buf


def m_tiles(rows: int) -> int:
    return 1 if rows <= 16 else 2


def smem_bytes(head_dim: int, tiles: int) -> int:
    """DecodeTraits::kSmemBytes: max(pipeline stages, warp-merge buffer) + the Q tile."""
    stages = 4 if head_dim <= 64 else 3 if head_dim <= 128 else 2
    pipe = stages * 2 * TILE_KEYS * head_dim * 2
    merge = 4 * 16 * tiles * (head_dim + 4) * 4
    return max(pipe, merge) + 16 * tiles * head_dim * 2


@functools.lru_cache(maxsize=None)
def choose_splits(ctas_per_split: int, cache_len: int, slots: int) -> int:
    """Splits of the cache per (batch, kv head): fill `slots` resident CTAs (SMs x CTAs per SM) with
    the fewest splits whose last wave is nearly as full as the best choice's."""
    most = max(1, min(MAX_SPLITS, -(-cache_len // TILE_KEYS)))

    def fill(splits: int) -> float:
        ctas = ctas_per_split * splits
        return ctas / (-(-ctas // slots) * slots)

    best = max(fill(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if fill(s) >= WAVE_FILL * best)


def unsupported_reason(q, k, v, attn_mask=None, kv_len=None) -> Optional[str]:
    """Why the decode kernel cannot take these inputs, naming the argument; None if it can."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return f"{name}: expected 4-D [B, H, S, D], got shape {tuple(t.shape)}"
        if t.dtype not in (torch.bfloat16, torch.float16):
            return f"{name}: dtype {t.dtype} is not supported by the decode kernel (bf16, fp16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"k/v: dtypes {k.dtype}/{v.dtype} differ from q's {q.dtype}"
    b, hq, s, d = q.shape
    if not 1 <= s <= MAX_NEW_TOKENS:
        return f"q: {s} new tokens per sequence; the decode kernel takes 1..{MAX_NEW_TOKENS}"
    if d not in MAX_ROWS:
        return f"q: head_dim {d} is not supported by the decode kernel ({sorted(MAX_ROWS)})"
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        return f"k/v: shapes {tuple(k.shape)}, {tuple(v.shape)} do not fit q {tuple(q.shape)}"
    if not 1 <= k.shape[2] < 2 ** 31:
        return f"k: cache length {k.shape[2]} is outside 1..2^31-1"
    if hq // k.shape[1] * s > MAX_ROWS[d]:
        return (f"q: {hq // k.shape[1]} q heads per kv head x {s} tokens = {hq // k.shape[1] * s} rows; "
                f"the decode kernel takes at most {MAX_ROWS[d]} for head_dim {d}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            return f"attn_mask: only boolean masks are supported, got {attn_mask.dtype}"
        if not broadcasts_to(attn_mask.shape, (b, hq, s, k.shape[2])):
            return f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to {(b, hq, s, k.shape[2])}"
    if kv_len is not None and (kv_len.dim() != 1 or kv_len.shape[0] not in (1, b)
                               or kv_len.dtype not in (torch.int32, torch.int64)):
        return f"kv_len: expected int32/int64 [B] or [1], got {kv_len.dtype} {tuple(kv_len.shape)}"
    if not q.is_cuda:
        return f"q: expected a CUDA tensor, got a tensor on {q.device}"
    for name, t in (("k", k), ("v", v), ("attn_mask", attn_mask), ("kv_len", kv_len)):
        if t is not None and t.device != q.device:
            return f"{name}: on {t.device}, but q is on {q.device}"
    return None


def supports_decode(q, k, v, attn_mask=None, kv_len=None) -> bool:
    return unsupported_reason(q, k, v, attn_mask, kv_len) is None


def _operand(x: torch.Tensor) -> torch.Tensor:
    """x read through its strides when rows are 16-byte aligned with a unit last stride, else a copy."""
    ok = x.stride(-1) == 1 and aligned16(x) and all(st % 8 == 0 for st in x.stride()[:-1])
    return x if ok else x.contiguous()


def variant(dtype: torch.dtype, head_dim: int, rows: int) -> tuple[str, int, int]:
    """(kernel name, threads, dynamic shared memory) of the split kernel for these inputs."""
    tiles = m_tiles(rows)
    return f"attn_decode_{DTYPE_SUFFIX[dtype]}_d{head_dim}_m{tiles}", 128 * tiles, smem_bytes(head_dim, tiles)


@functools.lru_cache(maxsize=None)
def _slots(name: str, device_index: int, threads: int, smem: int) -> int:
    """CTAs of this kernel resident on the whole GPU at once."""
    from cuda.bindings import driver
    device = torch.device("cuda", device_index)
    fn = kernel(SOURCE, name, DecodeParams, device)
    fn.set_max_dynamic_smem(smem)
    per_sm = check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn.function, threads, smem),
                   f"cuOccupancyMaxActiveBlocksPerMultiprocessor({name})")
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(q: torch.Tensor, k: torch.Tensor) -> int:
    """The split count decode_attention_cuda picks for these shapes (fixed by L_max, not kv_len)."""
    b, hq, s, d = q.shape
    name, threads, smem = variant(q.dtype, d, hq // k.shape[1] * s)
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return choose_splits(b * k.shape[1], k.shape[2], _slots(name, index, threads, smem))


def decode_attention_cuda(q, k, v, attn_mask=None, scale=None, is_causal=False, kv_len=None,
                          num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fusedops::attention for S <= 8 new tokens on CUDA. num_splits overrides the heuristic (tests);
    out: a contiguous tensor shaped and typed like q to write into (else one is allocated)."""
    reason = unsupported_reason(q, k, v, attn_mask, kv_len)
    if reason:
        raise ValueError(reason)
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0, got {scale}")
    b, hq, s, d = q.shape
    hkv, cache_len = k.shape[1], k.shape[2]
    group = hq // hkv
    rows = group * s
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {q.dtype} {tuple(q.shape)} on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if b == 0:
        return out
    q, k, v = _operand(q), _operand(k), _operand(v)
    name, threads, smem = variant(q.dtype, d, rows)
    num_splits = default_splits(q, k) if num_splits is None else num_splits
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits: must be in 1..{MAX_SPLITS}, got {num_splits}")

    p = DecodeParams(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    p.q_stride_b, p.q_stride_h, p.q_stride_s = q.stride()[:3]
    p.k_stride_b, p.k_stride_h, p.k_stride_l = k.stride()[:3]
    p.v_stride_b, p.v_stride_h, p.v_stride_l = v.stride()[:3]
    p.o_stride_b, p.o_stride_h, p.o_stride_s = out.stride()[:3]
    if attn_mask is not None:
        mask = attn_mask.expand(b, hq, s, cache_len)
        p.mask = mask.data_ptr()
        p.mask_stride_b, p.mask_stride_h, p.mask_stride_s, p.mask_stride_l = mask.stride()
    if kv_len is not None:
        p.kv_len = kv_len.data_ptr()
        p.kv_len_stride = kv_len.stride(0) if kv_len.shape[0] > 1 else 0
        p.kv_len_is_int64 = int(kv_len.dtype == torch.int64)
    p.heads_kv, p.seq_q, p.group, p.rows, p.cache_len = hkv, s, group, rows, cache_len
    p.num_splits, p.is_causal = num_splits, int(is_causal)
    p.scale_log2 = (1.0 / math.sqrt(d) if scale is None else scale) * math.log2(math.e)
    if num_splits > 1:
        o_partial = torch.empty(b * hkv * num_splits * rows * d, dtype=torch.float32, device=q.device)
        lse_partial = torch.empty(b * hkv * num_splits * rows, dtype=torch.float32, device=q.device)
        p.o_partial, p.lse_partial = o_partial.data_ptr(), lse_partial.data_ptr()

    merge_here = num_splits > 1 and MERGE_IN_SPLIT_KERNEL and d in MERGES_IN_SPLIT_KERNEL
    counters = semaphores(q.device, b * hkv) if merge_here else None
    if counters is not None:
        p.semaphores = counters.data_ptr()
    kernel(SOURCE, name, DecodeParams, q.device).launch((num_splits, hkv, b), (threads,), p, smem=smem)
    if num_splits > 1 and counters is None:
        combine = kernel(SOURCE, f"attn_decode_combine_{DTYPE_SUFFIX[q.dtype]}_d{d}", DecodeParams, q.device)
        combine.launch((-(-rows // COMBINE_WARPS), hkv, b), (32 * COMBINE_WARPS,), p)
    return out
