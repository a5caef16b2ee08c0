"""Decode attention (csrc/attention_decode.cu ↔ fusedops/ops/attention_decode.py): the split/combine
arithmetic on the CPU, the build (PTX instructions, shared-memory sizes, zero spills), argument errors,
and on the GPU a randomized sweep against the fp32 reference plus a CUDA-graph replay as kv_len grows."""
import math
import random
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from fusedops.ops import attention_decode as dec
from fusedops.ops.attention import attention_reference
from fusedops.runtime import compiler
from conftest import capture_graph, poison_, random_with_outliers, rel_err

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
VARIANTS = [(d, m) for d, rows in dec.MAX_ROWS.items() for m in (1, 2) if 16 * m <= rows]


# ---- CPU: the algorithm and the launcher's arithmetic ------------------------------------------------

def split_ranges(length: int, num_splits: int) -> list[tuple[int, int]]:
    """split_chunk/active_splits of csrc/attention_decode_params.cuh, in Python."""
    per_split = -(-length // num_splits)
    chunk = -(-per_split // dec.TILE_KEYS) * dec.TILE_KEYS
    active = -(-length // chunk) if chunk else 0
    return [(s * chunk, min((s + 1) * chunk, length)) for s in range(active)]


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 520, 1024, 4097])
@pytest.mark.parametrize("num_splits", [1, 3, 33, 128])
def test_split_ranges_tile_the_valid_keys(length, num_splits):
    ranges = split_ranges(length, num_splits)
    assert len(ranges) <= num_splits
    assert [k for lo, hi in ranges for k in range(lo, hi)] == list(range(length))
    assert all(lo % dec.TILE_KEYS == 0 and hi > lo for lo, hi in ranges)


def test_split_then_combine_equals_softmax_in_float64():
    """Per-split normalized output + log2-sum-exp, merged with exp2 weights (the two kernels' math)."""
    gen = torch.Generator().manual_seed(0)
    length, d = 1000, 16
    scores = torch.randn(length, generator=gen, dtype=torch.float64) * 4
    scores[torch.rand(length, generator=gen) < 0.3] = -math.inf  # masked keys, some splits all masked
    scores[64:192] = -math.inf
    v = torch.randn(length, d, generator=gen, dtype=torch.float64)
    parts = []
    for lo, hi in split_ranges(length, 7):
        x = scores[lo:hi] * math.log2(math.e)
        m = x.max()
        if m == -math.inf:
            parts.append((torch.zeros(d, dtype=torch.float64), -math.inf))
            continue
        p = torch.exp2(x - m)
        parts.append((p @ v[lo:hi] / p.sum(), (m + torch.log2(p.sum())).item()))
    top = max(lse for _, lse in parts)
    weights = torch.tensor([0.0 if lse == -math.inf else 2.0 ** (lse - top) for _, lse in parts], dtype=torch.float64)
    merged = sum(w * o for w, (o, _) in zip(weights, parts)) / weights.sum()
    assert torch.allclose(merged, torch.softmax(scores, 0) @ v, rtol=1e-12, atol=1e-12)


def test_choose_splits_fills_the_h100():
    slots = 132 * 2
    assert dec.choose_splits(32 * 8, 32768, slots) == 1            # B=32: one wave already
    assert dec.choose_splits(8 * 8, 32768, slots) == 4             # B=8: 256 CTAs
    assert dec.choose_splits(1 * 8, 32768, slots) == 32            # B=1: 256 CTAs
    assert dec.choose_splits(1 * 8, 100, slots) == 2               # never more splits than tiles
    assert dec.choose_splits(1, 10 ** 6, slots) <= dec.MAX_SPLITS


def cpu_inputs(b=2, hq=8, hkv=2, s=1, d=128, cache=64, dtype=torch.bfloat16):
    return (torch.zeros(b, hq, s, d, dtype=dtype), torch.zeros(b, hkv, cache, d, dtype=dtype),
            torch.zeros(b, hkv, cache, d, dtype=dtype))


@pytest.mark.parametrize("change, argument", [
    (dict(dtype=torch.float32), "q: dtype"),
    (dict(d=96), "q: head_dim 96"),
    (dict(s=9), "q: 9 new tokens"),
    (dict(hq=8, hkv=1, s=5), "q: 8 q heads per kv head x 5 tokens"),
    (dict(hq=6, hkv=4), "k/v: shapes"),
    (dict(), "q: expected a CUDA tensor"),
])
def test_unsupported_inputs_name_the_argument(change, argument):
    q, k, v = cpu_inputs(**change)
    assert not dec.supports_decode(q, k, v)
    with pytest.raises(ValueError, match=re.escape(argument)):
        dec.decode_attention_cuda(q, k, v)


def test_bad_mask_and_kv_len_name_the_argument():
    q, k, v = cpu_inputs()
    with pytest.raises(ValueError, match="attn_mask: only boolean"):
        dec.decode_attention_cuda(q, k, v, attn_mask=torch.zeros(2, 1, 1, 64))
    with pytest.raises(ValueError, match="attn_mask: shape"):
        dec.decode_attention_cuda(q, k, v, attn_mask=torch.ones(2, 1, 1, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_len: expected"):
        dec.decode_attention_cuda(q, k, v, kv_len=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_len: expected"):
        dec.decode_attention_cuda(q, k, v, kv_len=torch.ones(2, dtype=torch.float32))


# ---- nvcc: what the kernel promises, checked in its PTX and ptxas report ------------------------------

@pytest.mark.nvcc
def test_ptx_has_async_copies_tensor_cores_and_shuffles():
    ptx = compiler.emit_ptx(dec.SOURCE, "sm_90a")
    for instruction in ("cp.async.cg.shared.global", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "shfl.sync.bfly", "ex2.approx",
                        "ld.global.cg.v4.f32"):
        assert instruction in ptx, instruction
    assert re.search(r"cp\.async\.cg\.shared\.global \[%r\d+\], \[%rd\d+\], 16", ptx)  # 16-byte copies


@pytest.mark.nvcc
def test_build_has_no_spills():
    log = Path(str(compiler.build(dec.SOURCE, "sm_90a")) + ".log").read_text()
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    merging = [v for v in VARIANTS if v[0] in dec.MERGES_IN_SPLIT_KERNEL]   # + their merge_if_last function
    assert len(spills) == 2 * (len(VARIANTS) + len(dec.MAX_ROWS) + len(merging))  # every kernel, both dtypes
    assert all(s == ("0", "0") for s in spills), log


def ptx_bodies(ptx: str, needle: str) -> dict:
    """name -> body of each kernel (.entry) or function (.func) defined in the PTX whose name contains needle."""
    out = {}
    for m in re.finditer(r"\.(?:func|entry)\s+(\S*" + re.escape(needle) + r"\S*?)\s*\(", ptx):
        brace, semi = ptx.find("{", m.end()), ptx.find(";", ptx.find(")", m.end()))
        if brace >= 0 and not 0 <= semi < brace:  # a definition, not a declaration
            out[m.group(1)] = ptx[brace:ptx.find("\n}\n", brace)]
    return out


@pytest.mark.nvcc
def test_split_kernels_count_arrivals_where_python_says_they_merge():
    """The split kernels of MERGES_IN_SPLIT_KERNEL head dims call the merge (fence, count in with one
    atomic add, zero the counter, read the partials through L2); the others (D = 256) never do, so the
    launcher must run the combine kernel for them."""
    ptx = compiler.emit_ptx(dec.SOURCE, "sm_90a")
    merges = ptx_bodies(ptx, "merge_if_last")
    assert len(merges) == 2 * sum(d in dec.MERGES_IN_SPLIT_KERNEL for d, _ in VARIANTS)
    for body in merges.values():
        for instruction in ("membar.gl", "atom.add.u32", "atom.exch.b32", "ld.global.cg.v4.f32"):
            assert instruction in body, instruction
    for d, m in VARIANTS:
        for dtype in ("bf16", "fp16"):
            body = ptx_bodies(ptx, f"attn_decode_{dtype}_d{d}_m{m}")[f"attn_decode_{dtype}_d{d}_m{m}"]
            assert ("merge_if_last" in body) == (d in dec.MERGES_IN_SPLIT_KERNEL), (d, m, dtype)


@pytest.mark.nvcc
def test_python_shared_memory_sizes_match_the_traits():
    asserts = "\n".join(f"static_assert(fusedops::decode::DecodeTraits<__nv_bfloat16, {d}, {m}>::kSmemBytes == "
                        f"{dec.smem_bytes(d, m)}, \"d{d} m{m}\");" for d, m in VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "sizes.cu")
        src.write_text(f'#include <cuda_bf16.h>\n#include "attention_decode_params.cuh"\n{asserts}\n')
        proc = subprocess.run([compiler.nvcc_path(), "-std=c++17", f"-I{compiler.CSRC_DIR}", "-cubin",
                               compiler.arch_flag("sm_90a"), "-o", str(Path(tmp, "sizes.cubin")), str(src)],
                              capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- GPU: randomized sweep and CUDA-graph replay ------------------------------------------------------

def poison_allocator(device):
    """Fill free blocks of both allocator pools with NaN, so that internal buffers the kernels forget
    to write (the split partials) come out NaN too."""
    blocks = [torch.empty(1 << 26, dtype=torch.uint8, device=device)]
    blocks += [torch.empty(1 << 20, dtype=torch.uint8, device=device) for _ in range(8)]
    for blk in blocks:
        blk.fill_(0xFF)  # 0xFFFF... is a NaN in bf16, fp16 and fp32
    del blocks


def random_case(rng: random.Random):
    dtype = rng.choice([torch.bfloat16, torch.float16])
    d = rng.choice([64, 128, 128, 256])
    s = rng.choice([1, 1, 1, 2, 3, 4, 5, 8])
    hkv = rng.choice([1, 2, 4, 8])
    groups = [g for g in (1, 2, 4, 8) if g * s <= dec.MAX_ROWS[d]]
    group = rng.choice(groups)
    b = rng.choice([1, 1, 2, 3, 4])
    cache = rng.choice([1, 7, 64, 65, 200, 520, 1024, 1500, 3000])
    kv_len_kind = rng.choice(["none", "per_batch", "per_batch", "shared"])
    lengths = [rng.choice([0, 1, s, cache // 2, cache - 1, cache, rng.randint(0, cache)]) for _ in range(b)]
    lengths = [max(0, min(cache, n)) for n in lengths]
    mask_kind = rng.choice(["none", "none", "hf", "random_b1", "random_full", "random_1s"])
    return dict(dtype=dtype, d=d, s=s, hkv=hkv, hq=hkv * group, b=b, cache=cache, kv_len_kind=kv_len_kind,
                lengths=lengths, kv_dtype=rng.choice([torch.int32, torch.int64]), mask_kind=mask_kind,
                causal=rng.random() < 0.5, q_transposed=rng.random() < 0.5, cache_slice=rng.random() < 0.3,
                scale=rng.choice([None, None, 0.05]), num_splits=rng.choice([None, None, 1, 2, 5, 16]),
                seed=rng.randint(0, 2 ** 31))


def build_inputs(c, device="cuda"):
    gen = torch.Generator().manual_seed(c["seed"])
    b, hq, hkv, s, d, cache = c["b"], c["hq"], c["hkv"], c["s"], c["d"], c["cache"]
    if c["q_transposed"]:  # HF: q_proj output viewed as [B, S, Hq, D] then transposed
        q = random_with_outliers((b, s, hq, d), c["dtype"], device, gen).transpose(1, 2)
    else:
        q = random_with_outliers((b, hq, s, d), c["dtype"], device, gen)
    extra = 16 if c["cache_slice"] else 0  # a view of a longer cache: strided, not contiguous
    k = random_with_outliers((b, hkv, cache + extra, d), c["dtype"], device, gen)[:, :, :cache]
    v = random_with_outliers((b, hkv, cache + extra, d), c["dtype"], device, gen)[:, :, :cache]
    kv_len = None
    if c["kv_len_kind"] == "per_batch":
        kv_len = torch.tensor(c["lengths"], dtype=c["kv_dtype"], device=device)
    elif c["kv_len_kind"] == "shared":
        kv_len = torch.tensor(c["lengths"][:1], dtype=c["kv_dtype"], device=device)
    mask = None
    if c["mask_kind"] == "hf":  # StaticCache: key j visible to token i iff j <= position of token i
        length = torch.tensor(c["lengths"], device=device).view(b, 1, 1, 1)
        pos = length - s + torch.arange(s, device=device).view(1, 1, s, 1)
        mask = torch.arange(cache, device=device).view(1, 1, 1, cache) <= pos
    elif c["mask_kind"] != "none":
        shape = {"random_b1": (b, 1, s, cache), "random_full": (b, hq, s, cache), "random_1s": (1, 1, 1, cache)}
        mask = torch.rand(shape[c["mask_kind"]], generator=gen).to(device) < 0.8
    return q, k, v, mask, kv_len


def check_case(c):
    q, k, v, mask, kv_len = build_inputs(c)
    out = poison_(torch.empty(q.shape, dtype=q.dtype, device=q.device))
    poison_allocator(q.device)
    dec.decode_attention_cuda(q, k, v, mask, c["scale"], c["causal"], kv_len, num_splits=c["num_splits"], out=out)
    ref = attention_reference(q.float(), k.float(), v.float(), mask, c["scale"], c["causal"], kv_len)
    return rel_err(out, ref)


@pytest.mark.gpu
def test_random_sweep_matches_fp32_reference():
    rng = random.Random(2026)
    failures = []
    for i in range(240):
        c = random_case(rng)
        err = check_case(c)
        if not err <= TOLERANCE[c["dtype"]]:
            failures.append((i, err, c))
    assert not failures, f"{len(failures)} of 240 cases failed, first: {failures[:3]}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, cache, s", [(1, 1024, 1), (8, 4096, 1), (32, 2048, 1), (4, 3000, 8)])
def test_llama_shapes_with_hf_mask(dtype, b, cache, s):
    c = dict(dtype=dtype, d=128, s=s, hkv=8, hq=32, b=b, cache=cache, kv_len_kind="per_batch",
             lengths=[cache // 2 + 3 * i for i in range(b)], kv_dtype=torch.int64, mask_kind="hf", causal=False,
             q_transposed=True, cache_slice=False, scale=None, num_splits=None, seed=b)
    assert check_case(c) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_merge_in_split_kernel_equals_the_combine_kernel(monkeypatch):
    """Same splits, same merge order: the last-CTA merge and the combine kernel give the same bits, and
    every arrival counter is back at zero after each launch (lengths 0 included)."""
    rng = random.Random(11)
    for i in range(60):
        c = random_case(rng)
        c["num_splits"] = rng.choice([2, 5, 16, 128, None])
        if i % 7 == 0:
            c["lengths"] = [0] * c["b"]
        q, k, v, mask, kv_len = build_inputs(c)
        outs = []
        for merge_here in (True, False):
            monkeypatch.setattr(dec, "MERGE_IN_SPLIT_KERNEL", merge_here)
            out = poison_(torch.empty(q.shape, dtype=q.dtype, device=q.device))
            dec.decode_attention_cuda(q, k, v, mask, c["scale"], c["causal"], kv_len, c["num_splits"], out)
            outs.append(out)
            counters = dec._SEMAPHORES.get(q.device.index)
            assert counters is None or int(counters.abs().sum()) == 0, (i, c)
        assert torch.equal(outs[0], outs[1]), (i, c)
        ref = attention_reference(q.float(), k.float(), v.float(), mask, c["scale"], c["causal"], kv_len)
        assert rel_err(outs[0], ref) <= TOLERANCE[c["dtype"]], (i, c)


@pytest.mark.gpu
def test_capture_without_counters_falls_back_to_the_combine_kernel(monkeypatch):
    """Counters allocated during a capture would belong to that graph: the launch merges in the combine
    kernel instead, and allocates nothing."""
    monkeypatch.setattr(dec, "_SEMAPHORES", {})
    b, hq, hkv, d, cache = 1, 32, 8, 128, 2048
    gen = torch.Generator().manual_seed(3)
    q, k, v = (random_with_outliers(shape, torch.bfloat16, "cuda", gen)
               for shape in ((b, hq, 1, d), (b, hkv, cache, d), (b, hkv, cache, d)))
    kv_len = torch.tensor([1500], device="cuda")
    out = torch.empty(q.shape, dtype=q.dtype, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.decode_attention_cuda(q, k, v, None, None, False, kv_len, 16, out)
    assert dec._SEMAPHORES == {}
    poison_(out)
    graph.replay()
    ref = attention_reference(q.float(), k.float(), v.float(), None, None, False, kv_len)
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, None])
def test_cuda_graph_replay_follows_kv_len(num_splits):
    """Capture once at a short length, then grow kv_len (and the HF mask) between replays."""
    b, hq, hkv, d, cache = 2, 32, 8, 128, 1024
    gen = torch.Generator().manual_seed(7)
    q = random_with_outliers((b, hq, 1, d), torch.bfloat16, "cuda", gen)
    k = random_with_outliers((b, hkv, cache, d), torch.bfloat16, "cuda", gen)
    v = random_with_outliers((b, hkv, cache, d), torch.bfloat16, "cuda", gen)
    kv_len = torch.tensor([5, 3], dtype=torch.int32, device="cuda")
    keys = torch.arange(cache, device="cuda").view(1, 1, 1, cache)
    mask = keys < kv_len.view(b, 1, 1, 1)
    out = torch.empty(q.shape, dtype=q.dtype, device="cuda")
    run = lambda: dec.decode_attention_cuda(q, k, v, mask, None, True, kv_len, num_splits, out)  # noqa: E731
    graph, _ = capture_graph(run)
    for lengths in ([5, 3], [64, 65], [519, 520], [1000, 7], [1024, 1024], [0, 300]):
        kv_len.copy_(torch.tensor(lengths, dtype=torch.int32))
        mask.copy_(keys < kv_len.view(b, 1, 1, 1))
        poison_(out)
        graph.replay()
        ref = attention_reference(q.float(), k.float(), v.float(), mask, None, True, kv_len)
        assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16], lengths
