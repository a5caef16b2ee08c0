"""fusedops/quant.py: pack/unpack, quantize and dequantize against float64 re-implementations."""
import pytest
import torch

from fusedops import quant


def pack_by_hand(q: torch.Tensor) -> torch.Tensor:
    """Python-int bit packing of the documented layout: element j of a word in nibble (j % 2) * 4 + j // 2."""
    n, k = q.shape
    out = torch.empty(n, k // 8, dtype=torch.int32)
    for r in range(n):
        for w in range(k // 8):
            word = 0
            for j in range(8):
                word |= int(q[r, 8 * w + j]) << (4 * ((j % 2) * 4 + j // 2))
            out[r, w] = word - (1 << 32) if word >= 1 << 31 else word
    return out


def quantize_float64(w: torch.Tensor, group: int, symmetric: bool):
    """The documented rule in float64: range incl. 0, scale rounded to the weight dtype, round half even."""
    n, k = w.shape
    g = w.double().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if symmetric:
        s = (torch.maximum(hi, -lo) / 7).to(w.dtype).double()
        z = torch.full_like(s, 8.0)
    else:
        s = ((hi - lo) / 15).to(w.dtype).double()
        z = torch.round(-lo / torch.where(s == 0, 1.0, s)).clamp(0, 15)
    div = torch.where(s == 0, 1.0, s).unsqueeze(-1)
    q = (torch.round(g / div) + z.unsqueeze(-1)).clamp(0, 15)
    return q.reshape(n, k), s, z


def weights(dtype, n=48, k=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :128] = 0.0                    # an all-zero group
    w[1, :128] = 0.3                    # a constant group
    w[2, 128:256] = w[2, 128:256].abs() + 0.01   # one-signed groups
    w[3, 256:384] = -w[3, 256:384].abs() - 0.01
    w[4, 5] = 3.0                       # an outlier
    return w.to(dtype)


def test_pack_matches_bit_layout_and_unpack_inverts():
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert torch.equal(packed, pack_by_hand(q))
    assert torch.equal(quant.unpack_int4(packed), q)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(torch.full((1, 8), 15, dtype=torch.uint8))),
                       torch.full((1, 8), 15, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [128, 64])
def test_quantize_matches_float64(dtype, symmetric, group):
    w = weights(dtype)
    qw = quant.quantize(w, group, symmetric)
    q64, s64, z64 = quantize_float64(w, group, symmetric)
    assert qw.qweight.dtype == torch.int32 and qw.qweight.shape == (48, 64) and qw.group == group
    assert torch.equal(quant.unpack_int4(qw.qweight).double(), q64)
    assert qw.scales.dtype == dtype and torch.equal(qw.scales.double(), s64)
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == dtype and torch.equal(qw.zeros.double(), z64)
    # dequantize: (q - z) * s is exact in float64; one rounding to the dtype
    deq64 = ((q64.reshape(48, -1, group) - z64.unsqueeze(-1)) * s64.unsqueeze(-1)).reshape(48, -1)
    deq = quant.dequantize(*qw)
    assert deq.dtype == dtype and torch.equal(deq, deq64.to(dtype))
    # special groups come back (nearly) exactly; every weight within half a step, plus the rounding of
    # s and of the result to the dtype
    assert torch.equal(deq[0, :128], w[0, :128])
    assert torch.allclose(deq[1, :128].double(), w[1, :128].double(), rtol=1e-2)
    step = s64.repeat_interleave(group, 1)
    assert ((deq.double() - w.double()).abs() <= step * 0.52 + 1e-2 * w.double().abs()).all()


def test_asymmetric_beats_symmetric_on_gaussian_weights():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3)).bfloat16()
    err = {sym: ((quant.dequantize(*quant.quantize(w, 128, sym)).double() - w.double()).norm() / w.double().norm()).item()
           for sym in (False, True)}
    assert err[False] < 0.11 and err[False] < err[True]


def test_errors_name_the_argument():
    w = torch.randn(8, 256).bfloat16()
    with pytest.raises(ValueError, match="^weight: dtype"):
        quant.quantize(w.float())
    with pytest.raises(ValueError, match="^weight: expected"):
        quant.quantize(w[0])
    with pytest.raises(ValueError, match="^group: expected"):
        quant.quantize(w, 48)
    with pytest.raises(ValueError, match="^group: 128 does not divide"):
        quant.quantize(torch.randn(8, 96).bfloat16())
    with pytest.raises(ValueError, match="^q: values"):
        quant.pack_int4(torch.full((1, 8), 16))
    with pytest.raises(ValueError, match="^q: expected"):
        quant.pack_int4(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="^qweight: expected"):
        quant.unpack_int4(torch.zeros(2, 2, dtype=torch.int64))
    qw = quant.quantize(w)
    with pytest.raises(ValueError, match="^scales: shape"):
        quant.dequantize(qw.qweight, qw.scales[:, :1], qw.zeros, 128)
    with pytest.raises(ValueError, match="^zeros:"):
        quant.dequantize(qw.qweight, qw.scales, qw.zeros.half(), 128)
