"""fusedops::attention / attention_varlen: the fp32 references against float64 math, argument errors,
the kernel build (PTX/SASS instructions, zero spills) on the CPU box; the prefill kernel against the
fp32 reference on the GPU (randomized sweep with poisoned outputs, LSE, strided views, varlen, graphs)."""
import math
import os
import random
import shutil

import pytest
import torch

from fusedops.ops import attention as A
from fusedops.runtime import compiler
from tests.conftest import poison_, random_with_outliers, rel_err

F = torch.ops.fusedops
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def naive_attention64(q, k, v, mask=None, scale=None, causal=False, kv_len=None):
    """Row-by-row float64 softmax attention, written independently of attention_reference."""
    b, hq, s, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, s, d, dtype=torch.float64)
    for bi in range(b):
        length = skv if kv_len is None else int(kv_len.view(-1)[bi if kv_len.numel() > 1 else 0])
        for h in range(hq):
            kh, vh = k[bi, h // (hq // hkv)].double(), v[bi, h // (hq // hkv)].double()
            for i in range(s):
                keys = [j for j in range(min(skv, max(length, 0)))
                        if (not causal or j <= i + length - s)
                        and (mask is None or bool(mask.expand(b, hq, s, skv)[bi, h, i, j]))]
                if keys:
                    w = torch.softmax((kh[keys] @ q[bi, h, i].double()) * scale, 0)
                    out[bi, h, i] = w @ vh[keys]
    return out


# ---- CPU: reference semantics ------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 5, 9, 2), (1, 6, 7, 7, 3), (2, 2, 6, 4, 1)])  # B, Hq, S, Skv, Hkv
def test_reference_matches_float64(shape, causal):
    b, hq, s, skv, hkv = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, 16, generator=g) for h, n in ((hq, s), (hkv, skv), (hkv, skv)))
    mask = torch.rand(b, 1, s, skv, generator=g) > 0.3
    kv_len = torch.tensor([skv, max(skv - 3, 0)][:b], dtype=torch.int32)
    for m, kl in ((None, None), (mask, None), (None, kv_len), (mask, kv_len)):
        got = A.attention_reference(q, k, v, m, 0.3, causal, kl)
        assert rel_err(got, naive_attention64(q, k, v, m, 0.3, causal, kl)) < 1e-6


def test_varlen_reference_is_per_sequence_attention():
    g = torch.Generator().manual_seed(1)
    lens_q, lens_k = [3, 1, 6], [5, 4, 6]
    q, k, v = torch.randn(10, 4, 16, generator=g), torch.randn(15, 2, 16, generator=g), torch.randn(15, 2, 16, generator=g)
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 15], dtype=torch.int32)
    got = F.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, None, True)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref = naive_attention64(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                v[ks].transpose(0, 1)[None], causal=True)[0].transpose(0, 1)
        assert rel_err(got[qs], ref) < 1e-6, (b, lens_q[b], lens_k[b])


def naive_mask_blocks(mask):
    """Per-cell flags by brute force over a 4-D mask (independent of mask_blocks_reference)."""
    bm, hm, sm, km = mask.shape
    rows, cols = -(-sm // 64), -(-km // 32)
    out = torch.zeros(bm, hm, rows, cols, dtype=torch.uint8)
    for b in range(bm):
        for h in range(hm):
            for r in range(rows):
                for c in range(cols):
                    cell = mask[b, h, r * 64:(r + 1) * 64, c * 32:(c + 1) * 32]
                    out[b, h, r, c] = int(bool(cell.any())) * A.MASK_SOME_VISIBLE + int(bool((~cell).any())) * A.MASK_SOME_MASKED
    return out


@pytest.mark.parametrize("shape", [(2, 1, 130, 70), (1, 3, 64, 32), (1, 1, 1, 97), (1, 2, 200, 1)])
def test_mask_blocks_reference_matches_brute_force(shape):
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(shape, generator=g) > 0.5
    mask[..., : shape[2] // 2, :] = True   # all-visible and all-masked cells next to mixed ones
    mask[..., -1:, :] = False
    assert torch.equal(A.mask_blocks_reference(mask), naive_mask_blocks(mask))
    assert torch.equal(F.attention_mask_blocks(mask[0, 0]), naive_mask_blocks(mask[:1, :1]))  # 2-D mask


def test_mask_blocks_are_accepted_and_ignored_by_the_cpu_reference():
    """Only validation here (the CPU op never reads the map); the GPU sweep checks the kernel's use of it."""
    q, k, v = _qkv(torch.float32)
    mask = torch.rand(1, 1, 3, 5) > 0.4
    with_map = F.attention(q, k, v, mask, None, False, None, F.attention_mask_blocks(mask))
    assert torch.equal(with_map, F.attention(q, k, v, mask, None, False, None))


# ---- CPU: argument errors ----------------------------------------------------------------------

def _qkv(dtype=torch.bfloat16, d=64):
    return torch.randn(1, 4, 3, d, dtype=dtype), torch.randn(1, 2, 5, d, dtype=dtype), torch.randn(1, 2, 5, d, dtype=dtype)


@pytest.mark.parametrize("make, name", [
    (lambda q, k, v: (q, k.float(), v, None, None, False, None), "k"),
    (lambda q, k, v: (q, k[:, :1].expand(1, 3, 5, 64), v[:, :1].expand(1, 3, 5, 64), None, None, False, None), "k"),
    (lambda q, k, v: (q, k, v, torch.ones(1, 1, 3, 5), None, False, None), "attn_mask"),
    (lambda q, k, v: (q, k, v, torch.ones(2, 1, 3, 4, dtype=torch.bool), None, False, None), "attn_mask"),
    # a mask that would enlarge the result (batch 2 for B = 1; a 5th dim) is an error, not a broadcast
    (lambda q, k, v: (q, k, v, torch.ones(2, 1, 3, 5, dtype=torch.bool), None, False, None), "attn_mask"),
    (lambda q, k, v: (q, k, v, torch.ones(1, 1, 1, 3, 5, dtype=torch.bool), None, False, None), "attn_mask"),
    (lambda q, k, v: (q, k, v, None, None, False, torch.tensor([2.0])), "kv_len"),
    (lambda q, k, v: (q, k, v, None, -1.0, False, None), "scale"),
    (lambda q, k, v: (q[0], k, v, None, None, False, None), "q, k, v"),
])
def test_attention_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        F.attention(*make(*_qkv()))


def test_mask_blocks_errors_name_the_argument():
    q, k, v = _qkv()
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask_blocks: expected uint8"):
        F.attention(q, k, v, mask, None, False, None, torch.zeros(1, 1, 1, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask_blocks: given without attn_mask"):
        F.attention(q, k, v, None, None, False, None, torch.zeros(1, 1, 1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask: only boolean"):
        F.attention_mask_blocks(torch.ones(3, 5))


def test_cuda_unsupported_reasons():
    q, k, _ = _qkv(torch.float32)
    assert "dtype" in A.cuda_unsupported(q, k)
    q, k, _ = _qkv(d=96)
    assert "head_dim 96" in A.cuda_unsupported(q, k)
    q, k, _ = _qkv()
    assert A.cuda_unsupported(q, k) is None


@pytest.mark.parametrize("change, name", [
    (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int64)), "cu_seqlens_q"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_seqlens_k"),
    (dict(max_seqlen_q=-1), "max_seqlen_q"),
    (dict(k=torch.randn(5, 3, 64)), "k"),
])
def test_varlen_errors_name_the_argument(change, name):
    args = dict(q=torch.randn(3, 4, 64), k=torch.randn(5, 2, 64), v=torch.randn(5, 2, 64),
                cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32), max_seqlen_q=3, max_seqlen_k=5)
    args.update(change)
    if name == "k":
        args["v"] = args["k"]
    with pytest.raises(ValueError, match=name):
        F.attention_varlen(**args)


# ---- CPU: the kernel builds with the promised instructions -------------------------------------

@pytest.mark.nvcc
def test_ptx_has_cp_async_mma_ldmatrix():
    ptx = compiler.emit_ptx(A.PREFILL_SOURCES[(128, A.PREFILL_TILES[128][0])], "sm_90a")
    for instr in ("cp.async.cg.shared.global", "cp.async.wait_group", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                  "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "mma.sync.aligned.m16n8k16.row.col.f32.bf16",
                  "mma.sync.aligned.m16n8k16.row.col.f32.f16", "ex2.approx.ftz.f32", "shfl.sync.bfly"):
        assert instr in ptx, instr


@pytest.mark.nvcc
def test_mask_paths_in_ptx():
    """Block map: 16-byte mask loads; prefill: the map read, 2-key mask loads and the ballot walk."""
    assert "ld.global.v4.u32" in compiler.emit_ptx(A.MASK_BLOCKS_SOURCE, "sm_90a")
    ptx = compiler.emit_ptx(A.PREFILL_SOURCES[(128, A.PREFILL_TILES[128][0])], "sm_90a")
    for instr in ("ld.global.nc.u8", "ld.global.nc.u16", "vote.sync.ballot.b32"):
        assert instr in ptx, instr


@pytest.mark.nvcc
def test_mask_blocks_builds_without_spills():
    path = compiler.build(A.MASK_BLOCKS_SOURCE, "sm_90a")
    assert "0 bytes spill stores, 0 bytes spill loads" in path.with_name(path.name + ".log").read_text()


@pytest.mark.nvcc
@pytest.mark.parametrize("key", list(A.PREFILL_SOURCES), ids=lambda k: "d{}_m{}_n{}_w{}_b{}".format(k[0], *k[1]))
def test_variant_builds_without_spills(key):
    path = compiler.build(A.PREFILL_SOURCES[key], "sm_90a")
    log = path.with_name(path.name + ".log").read_text()
    assert log.count("0 bytes spill stores, 0 bytes spill loads") == 2, log


@pytest.mark.nvcc
@pytest.mark.skipif(not (shutil.which("cuobjdump") or os.path.exists(os.path.join(os.path.dirname(
    compiler.nvcc_path() or ""), "cuobjdump"))), reason="needs cuobjdump (not on the CPU box)")
def test_sass_has_ldgsts_ldsm_hmma():
    sass = compiler.disassemble(compiler.build(A.PREFILL_SOURCES[(128, A.PREFILL_TILES[128][0])], "sm_90a"))
    for instr in ("LDGSTS", "LDSM.16.M88.4", "LDSM.16.MT88.4", "HMMA.16816.F32.BF16", "MUFU.EX2"):
        assert instr in sass, instr


# ---- GPU: the kernel against the fp32 reference -------------------------------------------------

def _random_case(rng: random.Random):
    d = rng.choice([64, 128, 128, 256])
    hkv = rng.choice([1, 2, 4])
    c = dict(b=rng.randint(1, 3), hkv=hkv, hq=hkv * rng.choice([1, 2, 4]), s=rng.choice([1, 7, 16, 63, 64, 65, 130,
             rng.randint(1, 300)]), d=d, causal=rng.random() < 0.5, dtype=rng.choice([torch.bfloat16, torch.float16]),
             mask=rng.choice([None, None, "b1sk", "11sk", "bhsk", "sk"]), kv_len=rng.choice([None, None, "int32", "int64"]),
             strided=rng.random() < 0.5)
    c["skv"] = c["s"] + rng.choice([0, 0, rng.randint(1, 200)]) if c["causal"] else rng.randint(1, 320)
    return c


def _inputs(c, gen, dev="cuda"):
    b, hq, hkv, s, skv, d = c["b"], c["hq"], c["hkv"], c["s"], c["skv"], c["d"]
    if c["strided"]:  # HF's layout: [B, S, H, D] buffers seen as [B, H, S, D]
        q = random_with_outliers((b, s, hq, d), c["dtype"], dev, gen).transpose(1, 2)
        k = random_with_outliers((b, skv, hkv, d), c["dtype"], dev, gen).transpose(1, 2)
        v = random_with_outliers((b, skv, hkv, d), c["dtype"], dev, gen).transpose(1, 2)
    else:
        q, k, v = (random_with_outliers(shape, c["dtype"], dev, gen)
                   for shape in ((b, hq, s, d), (b, hkv, skv, d), (b, hkv, skv, d)))
    mask_shape = {None: None, "b1sk": (b, 1, s, skv), "11sk": (1, 1, s, skv), "bhsk": (b, hq, s, skv), "sk": (s, skv)}
    mask = None if c["mask"] is None else (torch.rand(mask_shape[c["mask"]], generator=gen) > 0.2).to(dev)
    kv_len = None
    if c["kv_len"]:
        kv_len = torch.randint(0, skv + 1, (b,), generator=gen).to(dev, getattr(torch, c["kv_len"]))
    return q, k, v, mask, kv_len


@pytest.mark.gpu
def test_random_sweep_against_fp32_reference():
    rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
    failures = []
    for i in range(240):
        c = _random_case(rng)
        q, k, v, mask, kv_len = _inputs(c, gen)
        tiles = A.PREFILL_TILES[c["d"]]
        tile = tiles[i % len(tiles)]
        scale = rng.choice([None, 0.05])
        out = poison_(torch.empty(q.shape, dtype=q.dtype, device="cuda"))
        lse = poison_(torch.empty(q.shape[:3], dtype=torch.float32, device="cuda"))
        A.attention_prefill_cuda(q, k, v, mask, scale, c["causal"], kv_len, lse=lse, tile=tile, out=out)
        ref = A.attention_reference(q.float(), k.float(), v.float(), mask, scale, c["causal"], kv_len)
        err = rel_err(out, ref)
        # LSE from the same fp32 scores; fully masked rows are -inf in both.
        ref_lse = _reference_lse(q, k, mask, scale, c["causal"], kv_len)
        lse_ok = torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.allclose(
            lse.nan_to_num(0, 0, 0), ref_lse.nan_to_num(0, 0, 0), atol=2e-2, rtol=1e-3)
        if not (err <= TOL[c["dtype"]] and lse_ok):
            failures.append((i, err, lse_ok, tile, c))
    assert not failures, failures[:5]


def _reference_lse(q, k, mask, scale, causal, kv_len):
    """log-sum-exp of the visible scaled scores, through attention_reference's own masking: the
    reference run with v = one-hot columns would not give it, so recompute the scores here."""
    b, hq, s, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    scores = q.float() @ kf.transpose(-1, -2) * scale
    length = kv_len.view(-1).long().expand(b) if kv_len is not None else torch.full((b,), skv, device=q.device)
    keys = torch.arange(skv, device=q.device)
    visible = (keys.view(1, 1, 1, skv) < length.view(b, 1, 1, 1)).expand(b, hq, s, skv)
    if causal:
        limit = torch.arange(s, device=q.device).view(1, 1, s, 1) + (length - s).view(b, 1, 1, 1)
        visible = visible & (keys.view(1, 1, 1, skv) <= limit)
    if mask is not None:
        visible = visible & mask.expand(b, hq, s, skv)
    return scores.masked_fill(~visible, float("-inf")).logsumexp(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference(causal):
    gen = torch.Generator().manual_seed(7)
    for d, dtype in ((64, torch.bfloat16), (128, torch.float16), (128, torch.bfloat16), (256, torch.bfloat16)):
        lens_q = [1, 77, 130, 5, 64]
        lens_k = [n + extra for n, extra in zip(lens_q, [0, 20, 0, 100, 1])] if causal else [3, 50, 200, 9, 64]
        cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
        cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
        q = random_with_outliers((int(cu_q[-1]), 8, d), dtype, "cuda", gen)
        k = random_with_outliers((int(cu_k[-1]), 2, d), dtype, "cuda", gen)
        v = random_with_outliers((int(cu_k[-1]), 2, d), dtype, "cuda", gen)
        out = F.attention_varlen(q, k, v, cu_q.cuda(), cu_k.cuda(), max(lens_q), max(lens_k), None, causal)
        ref = A.attention_varlen_reference(q.float(), k.float(), v.float(), cu_q, cu_k, None, causal)
        assert rel_err(out, ref) <= TOL[dtype], (d, dtype)


@pytest.mark.gpu
def test_op_on_cuda_and_its_errors():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (random_with_outliers(sh, torch.bfloat16, "cuda", gen) for sh in ((2, 8, 100, 128), (2, 2, 120, 128), (2, 2, 120, 128)))
    ref = A.attention_reference(q.float(), k.float(), v.float(), None, None, True, None)
    assert rel_err(F.attention(q, k, v, None, None, True, None), ref) <= TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="dtype"):
        F.attention(q.float(), k.float(), v.float(), None, None, True, None)
    with pytest.raises(ValueError, match="head_dim 96"):
        F.attention(q[..., :96], k[..., :96], v[..., :96], None, None, True, None)


@pytest.mark.gpu
def test_kv_len_is_read_on_the_device_under_cuda_graphs():
    gen = torch.Generator().manual_seed(5)
    q = random_with_outliers((2, 8, 16, 128), torch.bfloat16, "cuda", gen)
    k, v = (random_with_outliers((2, 2, 256, 128), torch.bfloat16, "cuda", gen) for _ in range(2))
    kv_len = torch.tensor([40, 200], dtype=torch.int32, device="cuda")
    run = lambda: A.attention_prefill_cuda(q, k, v, None, None, True, kv_len)  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lengths in ([40, 200], [17, 256], [256, 16]):
        kv_len.copy_(torch.tensor(lengths))
        graph.replay()
        ref = A.attention_reference(q.float(), k.float(), v.float(), None, None, True, kv_len)
        assert rel_err(out, ref) <= TOL[torch.bfloat16], lengths


# ---- GPU: boolean masks through the block map ----------------------------------------------------

MASK_KINDS = ("random", "causal_offset", "static_cache", "cells", "rows_masked")
MASK_LAYOUTS = ("contiguous", "keys_strided", "odd_offset")


def _make_mask(kind, shape, gen):
    """A [.., S, Skv] bool mask (CPU) of one structure; shape is the mask's own (broadcast) shape."""
    *lead, s, skv = shape
    q_pos, kv_pos = torch.arange(s).view(s, 1), torch.arange(skv).view(1, skv)
    if kind == "random":
        return torch.rand(shape, generator=gen) > float(torch.rand((), generator=gen))
    if kind == "causal_offset":  # chunked prefill: the queries sit at positions start.. of the cache
        start = int(torch.randint(-s // 2, skv + 1, (), generator=gen))
        return (kv_pos <= q_pos + start).expand(shape).clone()
    if kind == "static_cache":  # HF: causal at cache_position, inside the written part, left padding
        start = int(torch.randint(0, max(skv - s, 0) + 1, (), generator=gen))
        pad = torch.randint(0, s + start + 1, tuple(lead) + (1, 1), generator=gen)
        return (kv_pos <= q_pos + start) & (kv_pos < start + s) & (kv_pos >= pad)
    if kind == "cells":  # whole 64x32 cells visible / masked / random: every tile class side by side
        rows, cols = -(-s // 64), -(-skv // 32)
        choice = torch.randint(0, 3, tuple(lead) + (rows, cols), generator=gen)
        noise = torch.rand(shape, generator=gen) > 0.5
        full = choice.repeat_interleave(64, -2).repeat_interleave(32, -1)[..., :s, :skv]
        return torch.where(full == 2, noise, full == 1)
    mask = torch.rand(shape, generator=gen) > 0.3  # rows_masked: some query rows see nothing
    mask[..., torch.rand(s, generator=gen) < 0.3, :] = False
    return mask


def _lay_out(mask, layout):
    """The same values stored so that the kernels take their other load paths."""
    if layout == "keys_strided":  # key stride != 1: per-key byte loads
        return mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "odd_offset":  # odd base address: no 2-key / 16-byte loads
        flat = torch.zeros(mask.numel() + 1, dtype=torch.bool, device=mask.device)
        flat[1:] = mask.reshape(-1)
        return flat[1:].view(mask.shape)
    return mask


def _masked_case(rng: random.Random):
    d = rng.choice([64, 128, 128, 256])
    hkv = rng.choice([1, 2])
    b, hq = rng.randint(1, 2), hkv * rng.choice([1, 4])
    s = rng.choice([9, 64, 65, 127, 200, rng.randint(9, 400)])
    skv = rng.choice([s, s + rng.randint(1, 300), rng.randint(9, 500)])
    mask_shape = rng.choice([(b, 1, s, skv), (1, 1, s, skv), (b, hq, s, skv), (s, skv), (b, 1, 1, skv)])
    return dict(b=b, hq=hq, hkv=hkv, s=s, skv=skv, d=d, dtype=rng.choice([torch.bfloat16, torch.float16]),
                kind=rng.choice(MASK_KINDS), layout=rng.choice(MASK_LAYOUTS), mask_shape=mask_shape,
                causal=rng.random() < 0.25, kv_len=rng.random() < 0.3, precomputed=rng.random() < 0.5)


@pytest.mark.gpu
def test_mask_blocks_kernel_matches_reference():
    gen = torch.Generator().manual_seed(11)
    for i, shape in enumerate([(2, 1, 130, 70), (1, 3, 64, 4096), (1, 1, 2048, 2112), (3, 200, 48),
                               (2, 1, 1, 97), (1, 2, 200, 1), (1, 1, 65, 33), (5, 31)]):
        for layout in MASK_LAYOUTS:
            mask = _lay_out(_make_mask(MASK_KINDS[i % len(MASK_KINDS)], shape, gen).cuda(), layout)
            got = F.attention_mask_blocks(mask)
            assert torch.equal(got.cpu(), A.mask_blocks_reference(mask.cpu())), (shape, layout)


@pytest.mark.gpu
def test_masked_sweep_against_fp32_reference():
    """Random masks of every structure, broadcast shape and memory layout, with and without causal and
    kv_len, the block map precomputed or not; outputs and LSE poisoned first."""
    rng, gen = random.Random(4321), torch.Generator().manual_seed(4321)
    failures = []
    for i in range(300):
        c = _masked_case(rng)
        b, hq, hkv, s, skv, d = c["b"], c["hq"], c["hkv"], c["s"], c["skv"], c["d"]
        q, k, v = (random_with_outliers(sh, c["dtype"], "cuda", gen) for sh in ((b, hq, s, d), (b, hkv, skv, d), (b, hkv, skv, d)))
        mask = _lay_out(_make_mask(c["kind"], c["mask_shape"], gen).cuda(), c["layout"])
        kv_len = torch.randint(0, skv + 1, (b,), generator=gen).to("cuda", torch.int32) if c["kv_len"] else None
        blocks = F.attention_mask_blocks(mask) if c["precomputed"] else None
        tiles = A.PREFILL_TILES[d]
        tile = tiles[i % len(tiles)]
        out = poison_(torch.empty(q.shape, dtype=q.dtype, device="cuda"))
        lse = poison_(torch.empty(q.shape[:3], dtype=torch.float32, device="cuda"))
        A.attention_prefill_cuda(q, k, v, mask, None, c["causal"], kv_len, lse=lse, tile=tile, out=out,
                                 mask_blocks=blocks)
        ref = A.attention_reference(q.float(), k.float(), v.float(), mask, None, c["causal"], kv_len)
        ref_lse = _reference_lse(q, k, mask, None, c["causal"], kv_len)
        err = rel_err(out, ref)
        lse_ok = torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.allclose(
            lse.nan_to_num(0, 0, 0), ref_lse.nan_to_num(0, 0, 0), atol=2e-2, rtol=1e-3)
        if not (err <= TOL[c["dtype"]] and lse_ok and not out.isnan().any()):
            failures.append((i, err, lse_ok, tile, c))
    assert not failures, failures[:5]


@pytest.mark.gpu
def test_op_with_mask_blocks_under_cuda_graphs():
    """HF's StaticCache prefill through the op: the map is an input of the graph like the mask."""
    gen = torch.Generator().manual_seed(9)
    q = random_with_outliers((1, 8, 300, 128), torch.bfloat16, "cuda", gen)
    k, v = (random_with_outliers((1, 2, 512, 128), torch.bfloat16, "cuda", gen) for _ in range(2))
    mask = torch.zeros(1, 1, 300, 512, dtype=torch.bool, device="cuda")
    run = lambda: F.attention(q, k, v, mask, None, False, None, F.attention_mask_blocks(mask))  # noqa: E731
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for start in (0, 100, 212):
        mask.copy_(_make_mask("causal_offset", (1, 1, 300, 512), gen) if start == 100 else
                   (torch.arange(512).view(1, 512) <= torch.arange(300).view(300, 1) + start).view(1, 1, 300, 512))
        graph.replay()
        ref = A.attention_reference(q.float(), k.float(), v.float(), mask, None, False, None)
        assert rel_err(out, ref) <= TOL[torch.bfloat16], start
