"""fusedops::attention — SDPA semantics over GQA-native k/v (no repeat_kv), optionally restricted to
the first kv_len[b] keys of a static cache.

    q [B, Hq, S, D], k/v [B, Hkv, Skv, D] with Hq % Hkv == 0
    attn_mask: None or bool, broadcastable to [B, Hq, S, Skv]; True = attend (SDPA's convention)
    is_causal: query i sees key j <= i + (L - S), L = kv_len[b] if given else Skv (diagonal aligned
               to the end of the valid keys: chunked prefill / decode on top of a cache)
    kv_len:    None or int [B] (or [1]) on the device: keys j >= kv_len[b] are ignored. Read on the
               device, so a captured CUDA graph serves every step of a growing cache.
    mask_blocks: None or attention_mask_blocks(attn_mask), computed once and shared by every
               attention over the same mask (the backend inserts one per mask); None with a mask
               on CUDA computes it per call. It only steers which tiles the kernel visits and
               masks: the result is the same with or without it.
A query row with no visible key returns zeros (SDPA would return NaN).

fusedops::attention_mask_blocks(mask) summarizes a boolean mask per cell of MASK_CELL (64 query rows x
32 keys): bit 1 = some key visible, bit 2 = some key masked. The prefill kernel skips tiles with nothing
visible, runs tiles with nothing masked unmasked and reads the mask only in mixed tiles, so HF's
StaticCache mask (causal, within the cache length, padding) costs about what is_causal does.

fusedops::attention_varlen is the same for packed batches: q [T, Hq, D], k/v [Tk, Hkv, D], sequence
b owning rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (and likewise for k), causal diagonal aligned to the
end of each sequence.

CUDA path (csrc/attention_prefill.cu, FlashAttention-2-style): bf16/fp16, head_dim in PREFILL_TILES.
Other dtypes (fp32 included) and head dims raise ValueError there, so that the compile backend keeps
SDPA for them; `cuda_unsupported(...)` says why ahead of time. q/k/v are read through their strides
(HF's transposed [B, S, H, D] views need no copy); a tensor whose last dim is not contiguous, or whose
strides / address are not 16-byte aligned, is copied first. For S <= 8 the op hands over to the decode
kernel (fusedops.ops.attention_decode) when that module exists.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
from typing import NamedTuple, Optional

import torch

from ..runtime import register_source
from ._launch import DTYPE_SUFFIX, broadcasts_to, check_cuda, check_dtype, check_same_dtype, kernel


class PrefillTile(NamedTuple):
    block_m: int      # query rows per CTA
    block_n: int      # keys per pipeline stage
    warps: int
    min_blocks: int   # __launch_bounds__ minimum CTAs per SM (register cap)


# head_dim -> tile variants; the first is the one the op uses, the others are benchmark candidates.
# H100, 2026-11-25, causal S=8k, TFLOP/s: d128 128x32x4 277 > 64x64x4 250 > 128x64x8 248 (128x64x4
# spills: 255 regs + 84 B); d64 128x64x4 245 > 64x64x4 227. No variant here spills (tests check).
PREFILL_TILES: dict[int, tuple[PrefillTile, ...]] = {
    64: (PrefillTile(128, 64, 4, 1), PrefillTile(64, 64, 4, 1)),
    128: (PrefillTile(128, 32, 4, 1), PrefillTile(64, 64, 4, 1), PrefillTile(128, 64, 8, 1)),
    256: (PrefillTile(64, 32, 4, 1),),
}
PREFILL_STAGES = 2  # kStages in csrc/attention/prefill_traits.cuh
DECODE_MAX_QUERIES = 8  # S at or below this goes to the decode kernel when it exists


MASK_CELL = (64, 32)  # kMaskCellRows, kMaskCellKeys in csrc/attention/prefill_params.cuh
MASK_SOME_VISIBLE, MASK_SOME_MASKED = 1, 2

PREFILL_SOURCES: dict = {}  # (head_dim, PrefillTile) -> KernelSource
MASK_BLOCKS_SOURCE = register_source("attention_mask_blocks", "attention_mask_blocks.cu")


def tile_source(head_dim: int, tile: PrefillTile):
    """Register the compilation unit of one tile variant (-D flags select it in the .cu)."""
    flags = (f"-DFA_HEAD_DIM={head_dim}", f"-DFA_BLOCK_M={tile.block_m}", f"-DFA_BLOCK_N={tile.block_n}",
             f"-DFA_WARPS={tile.warps}", f"-DFA_MIN_BLOCKS={tile.min_blocks}")
    name = "attention_prefill_d{}_m{}_n{}_w{}_b{}".format(head_dim, *tile)
    source = register_source(name, "attention_prefill.cu", flags=flags)
    PREFILL_SOURCES[(head_dim, tile)] = source
    return source


for _head_dim, _tiles in PREFILL_TILES.items():
    for _tile in _tiles:
        tile_source(_head_dim, _tile)


def prefill_smem_bytes(head_dim: int, tile: PrefillTile) -> int:
    """kSmemSize of the traits: the Q tile plus PREFILL_STAGES stages of (K, V) tiles."""
    return (tile.block_m + PREFILL_STAGES * 2 * tile.block_n) * head_dim * 2


class AttentionPrefillParams(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("mask", ctypes.c_void_p),
                ("kv_len", ctypes.c_void_p), ("cu_seqlens_q", ctypes.c_void_p),
                ("cu_seqlens_k", ctypes.c_void_p), ("mask_blocks", ctypes.c_void_p),
                *[(f"{t}_{d}", ctypes.c_int64) for t in "qkvo" for d in ("batch", "head", "row")],
                ("lse_batch", ctypes.c_int64), ("lse_head", ctypes.c_int64),
                ("mask_batch", ctypes.c_int64), ("mask_head", ctypes.c_int64),
                ("mask_row", ctypes.c_int64), ("mask_col", ctypes.c_int64),
                ("kv_len_stride", ctypes.c_int64),
                *[(f"blocks_{d}", ctypes.c_int64) for d in ("batch", "head", "row", "col")],
                ("seqlen_q", ctypes.c_int32), ("seqlen_k", ctypes.c_int32),
                ("heads_q", ctypes.c_int32), ("group", ctypes.c_int32),
                ("kv_len_is_int64", ctypes.c_int32), ("is_causal", ctypes.c_int32),
                ("mask_pairs", ctypes.c_int32), ("scale_log2", ctypes.c_float), ("scale", ctypes.c_float)]


class MaskBlocksParams(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_void_p), ("blocks", ctypes.c_void_p),
                ("mask_batch", ctypes.c_int64), ("mask_head", ctypes.c_int64), ("mask_row", ctypes.c_int64),
                ("heads", ctypes.c_int32), ("rows", ctypes.c_int32), ("keys", ctypes.c_int32),
                ("cell_rows", ctypes.c_int32), ("cell_cols", ctypes.c_int32), ("vectorized", ctypes.c_int32)]

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


def _mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """mask with leading size-1 dims up to [Bm, Hm, Sm, Skvm] (a view)."""
    return mask[(None,) * (4 - mask.dim())] if mask.dim() < 4 else mask


def mask_blocks_shape(mask_shape) -> tuple[int, int, int, int]:
    """[Bm, Hm, ceil(Sm / 64), ceil(Skvm / 32)] for a mask of that shape (size-1 dims stay 1: broadcast)."""
    bm, hm, sm, km = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    return bm, hm, -(-sm // MASK_CELL[0]), -(-km // MASK_CELL[1])


def mask_blocks_reference(mask: torch.Tensor) -> torch.Tensor:
    """uint8 flags per MASK_CELL cell: MASK_SOME_VISIBLE | MASK_SOME_MASKED over the cell's elements."""
    m = _mask_4d(mask)
    bm, hm, rows, cols = mask_blocks_shape(m.shape)
    pad = (0, cols * MASK_CELL[1] - m.shape[3], 0, rows * MASK_CELL[0] - m.shape[2])
    flags = torch.zeros((bm, hm, rows, cols), dtype=torch.uint8, device=mask.device)
    for bit, part in ((MASK_SOME_VISIBLE, m), (MASK_SOME_MASKED, ~m)):  # padding holds neither
        cells = torch.nn.functional.pad(part.to(torch.uint8), pad).view(bm, hm, rows, MASK_CELL[0], cols, MASK_CELL[1])
        flags |= cells.amax(dim=(3, 5)) * bit
    return flags


def _validate_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: only boolean masks are supported, got {mask.dtype}")
    if not 1 <= mask.dim() <= 4:
        raise ValueError(f"mask: expected 1 to 4 dims, got shape {tuple(mask.shape)}")


@torch.library.custom_op("fusedops::attention_mask_blocks", mutates_args=(), device_types="cpu")
def attention_mask_blocks(mask: torch.Tensor) -> torch.Tensor:
    _validate_mask(mask)
    return mask_blocks_reference(mask)


@attention_mask_blocks.register_fake
def _(mask):
    _validate_mask(mask)
    return mask.new_empty(mask_blocks_shape(mask.shape), dtype=torch.uint8)


@attention_mask_blocks.register_kernel("cuda")
def _(mask):
    _validate_mask(mask)
    return mask_blocks_cuda(mask)


def mask_blocks_cuda(mask: torch.Tensor) -> torch.Tensor:
    """The one-pass kernel of csrc/attention_mask_blocks.cu (validated mask)."""
    m = _mask_4d(mask)
    if m.stride(3) != 1 and m.shape[3] > 1:
        m = m.contiguous()
    bm, hm, rows, cols = mask_blocks_shape(m.shape)
    blocks = torch.empty((bm, hm, rows, cols), dtype=torch.uint8, device=mask.device)
    if blocks.numel() == 0:
        return blocks
    p = MaskBlocksParams(m.data_ptr(), blocks.data_ptr())
    p.mask_batch, p.mask_head, p.mask_row = (st if n > 1 else 0 for st, n in zip(m.stride()[:3], m.shape[:3]))
    p.heads, p.rows, p.keys, p.cell_rows, p.cell_cols = hm, m.shape[2], m.shape[3], rows, cols
    p.vectorized = int(m.data_ptr() % 16 == 0 and m.shape[3] % 16 == 0
                       and all(st % 16 == 0 for st in (p.mask_batch, p.mask_head, p.mask_row)))
    fn = kernel(MASK_BLOCKS_SOURCE, "attention_mask_blocks", MaskBlocksParams, mask.device)
    fn.launch((-(-cols // 32), rows, bm * hm), (32, 8), p)
    return blocks


def _validate(q, k, v, attn_mask, scale, is_causal, kv_len, mask_blocks=None):
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
        if not broadcasts_to(attn_mask.shape, (b, hq, s, k.shape[2])):
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(b, hq, s, k.shape[2])}")
    if kv_len is not None and (kv_len.dim() != 1 or kv_len.shape[0] not in (1, b)
                               or kv_len.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"kv_len: expected int32/int64 [B] or [1], got {kv_len.dtype} {tuple(kv_len.shape)}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0, got {scale}")
    if mask_blocks is not None:
        if attn_mask is None:
            raise ValueError("mask_blocks: given without attn_mask")
        want = mask_blocks_shape(attn_mask.shape)
        if mask_blocks.dtype != torch.uint8 or tuple(mask_blocks.shape) != want:
            raise ValueError(f"mask_blocks: expected uint8 {want} (attention_mask_blocks(attn_mask)), got "
                             f"{mask_blocks.dtype} {tuple(mask_blocks.shape)}")


@torch.library.custom_op("fusedops::attention", mutates_args=(), device_types="cpu")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, is_causal: bool = False,
              kv_len: Optional[torch.Tensor] = None, mask_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    _validate(q, k, v, attn_mask, scale, is_causal, kv_len, mask_blocks)
    return attention_reference(q, k, v, attn_mask, scale, is_causal, kv_len).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask=None, scale=None, is_causal=False, kv_len=None, mask_blocks=None):
    _validate(q, k, v, attn_mask, scale, is_causal, kv_len, mask_blocks)
    return q.new_empty(q.shape)


def cuda_unsupported(q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """Why the CUDA kernel cannot take these inputs (None if it can): dtype or head_dim."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q: dtype {q.dtype} is not supported by the CUDA kernel (bf16, fp16)"
    if q.shape[-1] not in PREFILL_TILES:
        return f"q: head_dim {q.shape[-1]} is not supported by the CUDA kernel ({sorted(PREFILL_TILES)})"
    return None


def _kernel_operand(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernel can read it through its strides (unit last stride, 16-byte aligned
    rows and base), else a contiguous copy."""
    aligned = x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(
        st % 8 == 0 for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)
    return x if aligned else x.contiguous()


def _strides(x: torch.Tensor) -> list[int]:
    """Element strides of the leading dims, 0 for size-1 dims (never stepped over)."""
    return [st if n > 1 else 0 for st, n in zip(x.stride()[:-1], x.shape[:-1])]


@functools.lru_cache(maxsize=1)
def _decode_impl():
    """fusedops.ops.attention_decode.decode_attention_cuda when that module exists (written apart)."""
    if importlib.util.find_spec(f"{__package__}.attention_decode") is None:
        return None
    from . import attention_decode
    return attention_decode.decode_attention_cuda


def _launch_prefill(params: AttentionPrefillParams, q: torch.Tensor, grid_rows: int, batches: int,
                    tile: Optional[PrefillTile]) -> None:
    head_dim = q.shape[-1]
    tile = tile or PREFILL_TILES[head_dim][0]
    fn = kernel(PREFILL_SOURCES[(head_dim, tile)], f"attention_prefill_{DTYPE_SUFFIX[q.dtype]}",
                AttentionPrefillParams, q.device)
    grid = (-(-grid_rows // tile.block_m), params.heads_q, batches)
    fn.launch(grid, (tile.warps * 32,), params, smem=prefill_smem_bytes(head_dim, tile))


def _check_cuda_inputs(q, k, v, **extra) -> None:
    reason = cuda_unsupported(q, k)
    if reason:
        raise ValueError(reason)
    check_cuda("q", q)
    for name, t in (("k", k), ("v", v), *extra.items()):
        if t is not None:
            check_cuda(name, t, q.device)


def attention_prefill_cuda(q, k, v, attn_mask=None, scale=None, is_causal=False, kv_len=None,
                           lse: Optional[torch.Tensor] = None, tile: Optional[PrefillTile] = None,
                           out: Optional[torch.Tensor] = None, mask_blocks: Optional[torch.Tensor] = None):
    """The prefill kernel for any S (validated inputs). lse: optional fp32 [B, Hq, S] to fill with the
    natural-log sum-exp of each row (-inf where nothing is visible); tile: a PREFILL_TILES entry;
    out: optional contiguous tensor like q to write into (tests poison it first); mask_blocks:
    attention_mask_blocks(attn_mask), computed here when None."""
    _check_cuda_inputs(q, k, v, attn_mask=attn_mask, kv_len=kv_len, lse=lse, out=out, mask_blocks=mask_blocks)
    b, hq, s, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {q.dtype} {tuple(q.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if out.numel() == 0:
        return out
    if skv == 0:
        if lse is not None:
            lse.fill_(float("-inf"))
        return out.zero_()
    q, k, v = _kernel_operand(q), _kernel_operand(k), _kernel_operand(v)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = AttentionPrefillParams(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    p.q_batch, p.q_head, p.q_row = _strides(q)
    p.k_batch, p.k_head, p.k_row = _strides(k)
    p.v_batch, p.v_head, p.v_row = _strides(v)
    p.o_batch, p.o_head, p.o_row = out.stride()[:3]
    if lse is not None:
        if lse.dtype != torch.float32 or lse.shape != (b, hq, s) or not lse.is_contiguous():
            raise ValueError(f"lse: expected a contiguous float32 {(b, hq, s)}, got {lse.dtype} {tuple(lse.shape)}")
        p.lse, p.lse_batch, p.lse_head = lse.data_ptr(), hq * s, s
    if attn_mask is not None:
        if mask_blocks is None:
            mask_blocks = mask_blocks_cuda(attn_mask)
        mask = attn_mask.expand(b, hq, s, skv)
        p.mask = mask.data_ptr()
        strides = [st if n > 1 else 0 for st, n in zip(_mask_4d(attn_mask).stride(), _mask_4d(attn_mask).shape)]
        p.mask_batch, p.mask_head, p.mask_row, p.mask_col = strides
        p.mask_pairs = int(strides[3] == 1 and skv % 2 == 0 and all(st % 2 == 0 for st in strides[:3])
                           and p.mask % 2 == 0)
        p.mask_blocks = mask_blocks.data_ptr()
        p.blocks_batch, p.blocks_head, p.blocks_row, p.blocks_col = (
            st if n > 1 else 0 for st, n in zip(mask_blocks.stride(), mask_blocks.shape))
    if kv_len is not None:
        p.kv_len, p.kv_len_is_int64 = kv_len.data_ptr(), int(kv_len.dtype == torch.int64)
        p.kv_len_stride = kv_len.stride(0) if kv_len.shape[0] > 1 else 0
    p.seqlen_q, p.seqlen_k, p.heads_q, p.group = s, skv, hq, hq // hkv
    p.is_causal, p.scale, p.scale_log2 = int(is_causal), scale, scale * math.log2(math.e)
    _launch_prefill(p, q, s, b, tile)
    return out


@attention.register_kernel("cuda")
def _(q, k, v, attn_mask=None, scale=None, is_causal=False, kv_len=None, mask_blocks=None):
    _validate(q, k, v, attn_mask, scale, is_causal, kv_len, mask_blocks)
    _check_cuda_inputs(q, k, v, attn_mask=attn_mask, kv_len=kv_len, mask_blocks=mask_blocks)
    decode = _decode_impl() if q.shape[2] <= DECODE_MAX_QUERIES else None
    if decode is not None:  # reads the mask per key: no use for the block map
        return decode(q, k, v, attn_mask, scale, is_causal, kv_len)
    return attention_prefill_cuda(q, k, v, attn_mask, scale, is_causal, kv_len, mask_blocks=mask_blocks)


# ---- packed variable-length batches ---------------------------------------------------------------

def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, is_causal=False):
    """fp32 math: attention_reference on each packed sequence."""
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[b:b + 2], bounds_k[b:b + 2]
        seq = lambda x, lo, hi: x[lo:hi].transpose(0, 1).unsqueeze(0)  # noqa: E731  [1, H, S, D]
        out[q0:q1] = attention_reference(seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), None, scale,
                                         is_causal)[0].transpose(0, 1)
    return out


def _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    check_dtype("q", q, ATTENTION_DTYPES)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"q, k, v: expected [T, H, D] with matching D and k.shape == v.shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: {k.shape[1]} kv heads do not divide q's {q.shape[1]} heads")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name}: expected int32 [B + 1] with B >= 1, got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_k: {tuple(cu_seqlens_k.shape)} sequences, cu_seqlens_q has "
                         f"{tuple(cu_seqlens_q.shape)}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m < 0:
            raise ValueError(f"{name}: must be >= 0, got {m}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0, got {scale}")


@torch.library.custom_op("fusedops::attention_varlen", mutates_args=(), device_types="cpu")
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                     scale: Optional[float] = None, is_causal: bool = False) -> torch.Tensor:
    _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, is_causal).contiguous()


@attention_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, is_causal=False):
    _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return q.new_empty(q.shape)


def attention_varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None,
                          is_causal=False, lse: Optional[torch.Tensor] = None,
                          tile: Optional[PrefillTile] = None):
    """The prefill kernel over packed sequences. max_seqlen_q must bound every sequence's length
    (it sizes the grid). lse: optional contiguous fp32 [Hq, T]."""
    _check_cuda_inputs(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, lse=lse)
    total, hq, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0 or max_seqlen_q == 0:
        return out.zero_()
    q, k, v = _kernel_operand(q), _kernel_operand(k), _kernel_operand(v)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = AttentionPrefillParams(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    (p.q_row, p.q_head), (p.k_row, p.k_head), (p.v_row, p.v_head) = q.stride()[:2], k.stride()[:2], v.stride()[:2]
    p.o_row, p.o_head = out.stride()[:2]
    if lse is not None:
        if lse.dtype != torch.float32 or lse.shape != (hq, total) or not lse.is_contiguous():
            raise ValueError(f"lse: expected a contiguous float32 {(hq, total)}, got {lse.dtype} {tuple(lse.shape)}")
        p.lse, p.lse_head = lse.data_ptr(), total
    p.cu_seqlens_q, p.cu_seqlens_k = cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr()
    p.seqlen_q, p.seqlen_k, p.heads_q, p.group = max_seqlen_q, max_seqlen_k, hq, hq // k.shape[1]
    p.is_causal, p.scale, p.scale_log2 = int(is_causal), scale, scale * math.log2(math.e)
    _launch_prefill(p, q, max_seqlen_q, cu_seqlens_q.shape[0] - 1, tile)
    return out


@attention_varlen.register_kernel("cuda")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, is_causal=False):
    _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return attention_varlen_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                 is_causal)
