"""Group-wise int4 weight quantization (W4A16) of an nn.Linear weight [N, K], round-to-nearest.

Asymmetric by default: per group of `group` consecutive k, scale s = (max - min) / 15 rounded to the
weight dtype and an integer zero point z in 0..15, so w ~ (q - z) * s with q in 0..15. Asymmetric uses
all 16 levels on the actual [min, max] of a group (symmetric spends them on [-absmax, absmax], wasting
about one level on every skewed group); it costs one more 16-bit value per 128 weights (1.6 % of the
int4 bytes). The range always includes 0, so z is exact and a one-signed group loses nothing to
clamping. `symmetric=True` gives s = absmax / 7, z = 8 implied (zeros is None): q - 8 in -7..7.

Packed layout (what csrc/gemv_w4.cu reads): qweight int32 [N, K/8], one word per 8 consecutive k of a
row, rows contiguous, so a 16-byte load is 32 k of one row. Inside a word, element j (0..7) sits in
nibble (j % 2) * 4 + j // 2: nibbles 0..3 hold the even elements, 4..7 the odd ones. Then
`(word >> 4i) & 0x000F000F` places elements 2i and 2i+1 in the low and high 16-bit halves, and OR-ing
0x43004300 (bf16) / 0x64006400 (fp16) makes the pair (128 + q) or (1024 + q) in one lop3: two
consecutive k converted per instruction. scales / zeros: [N, K/group] in the weight dtype (zeros hold
exact integers), groups of one row contiguous.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

GROUP = 128
PACK = 8                       # int4 values per int32 word
_NIBBLE_OF = [(j % 2) * 4 + j // 2 for j in range(PACK)]   # element j of a word -> nibble index
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor            # int32 [N, K / 8]
    scales: torch.Tensor             # [N, K / group], weight dtype
    zeros: Optional[torch.Tensor]    # [N, K / group] integer values in the weight dtype; None: symmetric
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * PACK

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if isinstance(t, torch.Tensor))


def check_group(k: int, group: int) -> None:
    """group: a multiple of 32 (one 16-byte load of 32 k never straddles two groups) dividing K."""
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 32:
        raise ValueError(f"group: expected a positive multiple of 32, got {group!r}")
    if k % group:
        raise ValueError(f"group: {group} does not divide K = {k}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integer values 0..15 [N, K] -> int32 [N, K / 8] in the kernel's nibble order."""
    if q.dim() != 2 or q.shape[1] % PACK:
        raise ValueError(f"q: expected [N, K] with K a multiple of {PACK}, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"q: values must lie in 0..15, got [{int(q.min())}, {int(q.max())}]")
    words = q.to(torch.int64).reshape(q.shape[0], -1, PACK)
    shifts = torch.tensor([4 * n for n in _NIBBLE_OF], dtype=torch.int64, device=q.device)
    packed = (words << shifts).sum(-1)                          # disjoint bits: sum == or
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K / 8] -> uint8 [N, K] values 0..15 (inverse of pack_int4)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight: expected a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    shifts = torch.tensor([4 * n for n in _NIBBLE_OF], dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(-1) >> shifts) & 0xF                 # arithmetic shift: the mask drops the sign
    return q.reshape(qweight.shape[0], qweight.shape[1] * PACK).to(torch.uint8)


def quantize(weight: torch.Tensor, group: int = GROUP, symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest int4 of a [N, K] bf16/fp16 weight (on its own device)."""
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"weight: dtype {weight.dtype} is not supported (expected one of {list(SUPPORTED_DTYPES)})")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_group(k, group)
    with torch.no_grad():
        w = weight.reshape(n, k // group, group)
        lo = w.amin(-1).double().clamp(max=0)               # [N, G], exact
        hi = w.amax(-1).double().clamp(min=0)
        if symmetric:
            scale = (torch.maximum(hi, -lo) / 7).to(weight.dtype)
            zero = torch.full_like(hi, 8.0)
        else:
            scale = ((hi - lo) / 15).to(weight.dtype)
            zero = torch.round(-lo / _nonzero(scale.double())).clamp(0, 15)
        s = _nonzero(scale.double()).float().unsqueeze(-1)
        # bf16 / bf16 in fp32 rounds like float64 would: two 8-bit significands are never within
        # 2^-24 of a .5 tie without being on it.
        q = (torch.round(w.float() / s) + zero.float().unsqueeze(-1)).clamp(0, 15)
        qweight = pack_int4(q.reshape(n, k).to(torch.uint8))
    zeros = None if symmetric else zero.to(weight.dtype).contiguous()
    return QuantizedWeight(qweight, scale.contiguous(), zeros, group)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero group (scale 0) divides by 1 instead: q = z, dequantized to 0."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(q - z) * s computed in fp32 (exact: a 5-bit integer times a 16-bit float) and rounded once to
    `dtype` (default: the scales' dtype): the weight the dequantize route and the CPU references multiply
    with. The int4 GEMV multiplies by the exact value (dtype=torch.float32 or float64 gives it)."""
    q = unpack_int4(qweight)
    n, k = q.shape
    check_group(k, group)
    groups = k // group
    if scales.shape != (n, groups):
        raise ValueError(f"scales: shape {tuple(scales.shape)} != {(n, groups)} for qweight {tuple(qweight.shape)}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != scales.dtype):
        raise ValueError(f"zeros: {zeros.dtype} {tuple(zeros.shape)} must match scales' {scales.dtype} "
                         f"{tuple(scales.shape)}")
    z = zeros.float() if zeros is not None else torch.full_like(scales, 8, dtype=torch.float32)
    w = (q.float().reshape(n, groups, group) - z.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype or scales.dtype)
