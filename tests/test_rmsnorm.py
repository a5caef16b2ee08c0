"""fusedops::rms_norm: CPU reference vs float64 HF math, bad input, the kernel's PTX and cache key,
and on the GPU a random sweep against float64 with poisoned outputs."""
import random
import shutil

import pytest
import torch

from conftest import poison_, random_with_outliers, rel_err
from fusedops.ops import rmsnorm
from fusedops.runtime import compiler

op = torch.ops.fusedops.rms_norm
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def exact(x, w, eps):
    """LlamaRMSNorm in float64, no intermediate rounding: the truth both sides are measured against."""
    h = x.double()
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x = random_with_outliers((7, 333), dtype, "cpu", g)
    w = torch.randn(333, generator=g).to(dtype)
    assert rel_err(op(x, w, 1e-6), exact(x, w, 1e-6)) <= MAX_ERR[dtype]


def test_reference_is_hf_rmsnorm_rounded_once():
    x = torch.randn(64, 256).bfloat16()
    w = torch.randn(256).bfloat16()
    h = x.double()
    exact = w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    hf = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    out = op(x, w, 1e-5)
    assert torch.equal(out, exact.bfloat16()) or rel_err(out, exact) < 2e-3
    assert rel_err(out, exact) < rel_err(hf, exact)   # eager HF rounds before the weight too


def test_opcheck_cpu():
    x, w = torch.randn(3, 5, 64), torch.randn(64)
    torch.library.opcheck(op, (x, w, 1e-6))


@pytest.mark.parametrize("x, w, eps, arg", [
    (torch.randn(2, 8).double(), torch.randn(8).double(), 1e-6, "x"),
    (torch.ones(2, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 1e-6, "x"),
    (torch.randn(2, 8), torch.randn(7), 1e-6, "weight"),
    (torch.randn(2, 8), torch.randn(8).half(), 1e-6, "weight"),
    (torch.randn(2, 8), torch.randn(2, 8), 1e-6, "weight"),
    (torch.randn(2, 8), torch.randn(8), -1.0, "eps"),
])
def test_bad_input_names_the_argument(x, w, eps, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        op(x, w, eps)


@pytest.mark.nvcc
def test_ptx_has_128bit_loads_and_warp_shuffles():
    ptx = compiler.emit_ptx(rmsnorm.SOURCE, "sm_90a")
    assert "ld.global.v4" in ptx
    assert "st.global.v4" in ptx
    assert "shfl.sync.bfly" in ptx


@pytest.mark.nvcc
def test_cache_key_follows_included_headers(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(compiler.CSRC_DIR, csrc)
    monkeypatch.setattr(compiler, "CSRC_DIR", csrc)
    src = compiler.KernelSource(name="rmsnorm_copy", path=csrc / "rmsnorm.cu")
    keys = [compiler.cache_key(src, "sm_90a")]
    for header in ("rmsnorm.cuh", "common/reduce.cuh", "common/vec.cuh"):
        with open(csrc / header, "a") as f:
            f.write("\n// changed\n")
        keys.append(compiler.cache_key(src, "sm_90a"))
    assert len(set(keys)) == len(keys)
    assert compiler.cache_key(src, "sm_90a") == keys[-1]


# ---------------------------------------------------------------- GPU

def random_case(rng: random.Random):
    dtype = rng.choice(DTYPES)
    hidden = rng.choice([rng.randint(1, 300), rng.randrange(8, 9000, 8), rng.choice(
        [64, 128, 1024, 2048, 4096, 5120, 8192, 14336, 16384, 20000, 70016])])
    rows = rng.choice([1, 2, 3, 4, 16, rng.randint(1, 300)])
    return dtype, rows, hidden, rng.random() < 0.25  # strided rows


def run_case(dtype, rows, hidden, strided, seed, items=None):
    g = torch.Generator().manual_seed(seed)
    pad = 8 if strided else 0
    base = random_with_outliers((rows, hidden + pad), dtype, "cuda", g)
    x = base[:, :hidden]
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).cuda()
    out = poison_(torch.empty(rows, hidden, dtype=dtype, device="cuda"))
    rmsnorm.launch(x, w, out, 1e-6, items)
    ref = exact(x, w, 1e-6)
    err, torch_err = rel_err(out, ref), rel_err(rmsnorm.rms_norm_reference(x, w, 1e-6), ref)
    assert err <= max(2 * torch_err, 1e-6) and err <= MAX_ERR[dtype], (dtype, rows, hidden, strided, err, torch_err)


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(1234)
    for seed in range(200):
        run_case(*random_case(rng), seed)


@pytest.mark.gpu
@pytest.mark.parametrize("items", rmsnorm.CACHED_ITEMS)
def test_every_cached_variant(items):
    for dtype in DTYPES:
        run_case(dtype, 5, 2048, False, items, items)


@pytest.mark.gpu
def test_op_on_3d_strided_input_and_opcheck():
    x = torch.randn(2, 6, 1024, device="cuda", dtype=torch.bfloat16)[:, ::2]
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    assert rel_err(op(x, w, 1e-5), exact(x, w, 1e-5)) < 1e-2
    torch.library.opcheck(op, (x, w, 1e-5))


@pytest.mark.gpu
def test_cpu_weight_with_cuda_x():
    with pytest.raises(ValueError, match="^weight:"):
        op(torch.randn(2, 8, device="cuda"), torch.randn(8), 1e-6)


@pytest.mark.gpu
def test_sanitizer_small_cases():
    """Tiny launches of every path, run under compute-sanitizer by the GPU check."""
    for dtype in DTYPES:
        for rows, hidden, strided in ((3, 64, False), (2, 40, True), (2, 37, False), (1, 9000, False),
                                      (1, 70016, False)):
            run_case(dtype, rows, hidden, strided, 0)


@pytest.mark.parametrize("dtype, rows, hidden, row_stride, expect", [
    (torch.bfloat16, 4, 4096, 4096, ("c1", 512)),
    (torch.bfloat16, 4, 8192, 8192, ("c1", 1024)),
    (torch.bfloat16, 4, 16384, 16384, ("c4", 512)),
    (torch.bfloat16, 1, 4096, 4096, ("c1", 512)),
    (torch.bfloat16, 3, 256, 256, ("c1", 32)),
    (torch.float32, 4, 4096, 4096, ("c1", 1024)),
    (torch.bfloat16, 4, 4096, 4104, ("c1", 512)),   # strided rows, still whole vectors
    (torch.bfloat16, 4, 4096, 4100, ("s1", 1024)),  # rows not 16-byte aligned
    (torch.bfloat16, 4, 4097, 4097, ("s1", 1024)),  # odd hidden size
    (torch.bfloat16, 2, 70016, 70016, ("sv", 1024)),
])
def test_kernel_plan_takes_the_vector_path_when_it_can(dtype, rows, hidden, row_stride, expect):
    """The 16-byte kernels must be chosen for ordinary contiguous rows (a 1-D weight's stride of 1 once
    sent every call to the scalar kernel at a third of the bandwidth)."""
    x = torch.empty(rows, row_stride, dtype=dtype)[:, :hidden]
    name, threads = rmsnorm.kernel_plan(x, torch.empty(hidden, dtype=dtype), torch.empty(rows, hidden, dtype=dtype))
    assert (name.rsplit("_", 1)[1], threads) == expect
