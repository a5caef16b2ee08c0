"""fusedops::layer_norm: reference vs float64, with/without weight and bias, bad input, PTX, and on the
GPU a random sweep against float64 with poisoned outputs."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import poison_, random_with_outliers, rel_err
from fusedops.ops import layernorm
from fusedops.runtime import compiler

op = torch.ops.fusedops.layer_norm
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def exact(x, w, b, eps):
    return F.layer_norm(x.double(), (x.shape[-1],), None if w is None else w.double(),
                        None if b is None else b.double(), eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x = random_with_outliers((5, 300), dtype, "cpu", g) + 3
    w, b = torch.randn(300, generator=g).to(dtype), torch.randn(300, generator=g).to(dtype)
    assert rel_err(op(x, w, b, 1e-5), exact(x, w, b, 1e-5)) <= MAX_ERR[dtype]


def test_opcheck_cpu():
    torch.library.opcheck(op, (torch.randn(2, 3, 40), torch.randn(40), torch.randn(40), 1e-5))
    torch.library.opcheck(op, (torch.randn(2, 40), torch.randn(40), None, 1e-5))


@pytest.mark.parametrize("w, b, eps, arg", [
    (torch.randn(7), None, 1e-5, "weight"),
    (torch.randn(8).half(), None, 1e-5, "weight"),
    (None, torch.randn(9), 1e-5, "bias"),
    (None, None, -1.0, "eps"),
])
def test_bad_input_names_the_argument(w, b, eps, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        op(torch.randn(2, 8), w, b, eps)


def test_plan_picks_the_fewest_vectors_a_thread_and_checks_forced_variants():
    assert layernorm.plan(768, 8, True) == ("c1", 96)
    assert layernorm.plan(4096, 8, True) == ("c1", 512)
    assert layernorm.plan(8192, 8, True) == ("c2", 512)
    assert layernorm.plan(4096, 8, True, "c4") == ("c4", 128)
    assert layernorm.plan(100, 8, False) == ("s1", 128)
    assert layernorm.plan(20000, 8, True) == ("sv", 1024)
    with pytest.raises(ValueError, match="^variant:"):
        layernorm.plan(8192, 8, True, "c1")
    with pytest.raises(ValueError, match="^variant:"):
        layernorm.plan(100, 8, False, "c1")


@pytest.mark.nvcc
def test_ptx_has_128bit_access_and_warp_shuffles():
    ptx = compiler.emit_ptx(layernorm.SOURCE, "sm_90a")
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx and "shfl.sync.bfly" in ptx


# ---------------------------------------------------------------- GPU

def run_case(dtype, rows, hidden, strided, affine, seed, variant=None):
    g = torch.Generator().manual_seed(seed)
    x = random_with_outliers((rows, hidden + (8 if strided else 0)), dtype, "cuda", g)[:, :hidden] + 2
    w = torch.randn(hidden, generator=g).to(dtype).cuda() if affine in ("w", "wb") else None
    b = torch.randn(hidden, generator=g).to(dtype).cuda() if affine in ("b", "wb") else None
    out = poison_(torch.empty(rows, hidden, dtype=dtype, device="cuda"))
    layernorm.launch(x, w, b, out, 1e-5, variant)
    ref = exact(x, w, b, 1e-5)
    err, torch_err = rel_err(out, ref), rel_err(layernorm.layer_norm_reference(x, w, b, 1e-5), ref)
    assert err <= max(2 * torch_err, 1e-6) and err <= MAX_ERR[dtype], (dtype, rows, hidden, affine, variant, err,
                                                                          torch_err)


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(31)
    for seed in range(200):
        hidden = rng.choice([rng.randint(1, 300), rng.randrange(8, 9000, 8), rng.choice([768, 4096, 8192, 20000])])
        run_case(rng.choice(DTYPES), rng.choice([1, 4, 16, rng.randint(1, 200)]), hidden, rng.random() < 0.25,
                 rng.choice(["wb", "w", "b", ""]), seed)


@pytest.mark.gpu
@pytest.mark.parametrize("variant, hidden", [("c1", 768), ("c1", 4096), ("c2", 4096), ("c4", 8192), ("c4", 1000)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_every_cached_variant(variant, hidden, dtype):
    for rows, affine in ((37, "wb"), (1, "w"), (5, "")):
        run_case(dtype, rows, hidden, False, affine, rows, variant)


@pytest.mark.gpu
def test_op_on_3d_input_and_opcheck():
    x = torch.randn(2, 5, 1024, device="cuda", dtype=torch.bfloat16)
    w, b = (torch.randn(1024, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert rel_err(op(x, w, b, 1e-5), exact(x, w, b, 1e-5)) < 1e-2
    torch.library.opcheck(op, (x, w, b, 1e-5))
    torch.library.opcheck(op, (x, None, None, 1e-5))


@pytest.mark.gpu
def test_sanitizer_small_cases():
    for dtype in DTYPES:
        for rows, hidden, affine in ((3, 64, "wb"), (2, 37, "w"), (2, 1000, ""), (1, 20000, "b")):
            run_case(dtype, rows, hidden, False, affine, 0)
