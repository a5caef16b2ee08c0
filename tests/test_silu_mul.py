"""fusedops::silu_mul and silu_mul_cat: HF LlamaMLP rounding, bad input, PTX, and on the GPU random
sweeps against float64 with poisoned outputs (odd sizes hit the scalar tail)."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import poison_, random_with_outliers, rel_err
from fusedops.ops import silu_mul
from fusedops.runtime import compiler

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def exact(g, u):
    g = g.double()
    return g * torch.sigmoid(g) * u.double()


def test_reference_is_hf_mlp_activation_rounded_once():
    g, u = torch.randn(64, 40).bfloat16(), torch.randn(64, 40).bfloat16()
    once = (F.silu(g.float()) * u.float()).bfloat16()
    assert torch.equal(torch.ops.fusedops.silu_mul(g, u), once)
    assert torch.equal(torch.ops.fusedops.silu_mul_cat(torch.cat([g, u], -1)), once)
    exact = F.silu(g.double()) * u.double()
    assert rel_err(once, exact) < rel_err(F.silu(g) * u, exact)   # eager rounds silu(g) first


def test_opcheck_cpu():
    torch.library.opcheck(torch.ops.fusedops.silu_mul, (torch.randn(2, 3, 8), torch.randn(2, 3, 8)))
    torch.library.opcheck(torch.ops.fusedops.silu_mul_cat, (torch.randn(2, 3, 16),))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="^u:"):
        torch.ops.fusedops.silu_mul(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="^u:"):
        torch.ops.fusedops.silu_mul(torch.randn(2, 8), torch.randn(2, 8).half())
    with pytest.raises(ValueError, match="^g:"):
        torch.ops.fusedops.silu_mul(torch.randn(2, 8).double(), torch.randn(2, 8).double())
    with pytest.raises(ValueError, match="^gu:"):
        torch.ops.fusedops.silu_mul_cat(torch.randn(2, 7))


@pytest.mark.nvcc
def test_ptx_has_128bit_access():
    ptx = compiler.emit_ptx(silu_mul.SOURCE, "sm_90a")
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx


# ---------------------------------------------------------------- GPU

def check(out, g, u, dtype, what):
    ref = exact(g, u)
    err, torch_err = rel_err(out, ref), rel_err(F.silu(g) * u, ref)
    assert err <= max(2 * torch_err, 1e-6) and err <= MAX_ERR[dtype], (what, err, torch_err)


def run_case(dtype, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    gu = random_with_outliers((rows, 2 * cols), dtype, "cuda", gen, scale=2.0)
    g, u = gu[:, :cols], gu[:, cols:]
    out = poison_(torch.empty(rows, cols, dtype=dtype, device="cuda"))
    silu_mul.launch(g, u, out)  # the cat path: strided rows
    check(out, g, u, dtype, ("cat", dtype, rows, cols))
    gc, uc = g.contiguous(), u.contiguous()
    out = poison_(torch.empty(rows * cols, dtype=dtype, device="cuda"))
    silu_mul.launch(gc.view(1, -1), uc.view(1, -1), out.view(1, -1))  # the two-tensor path: one long row
    check(out.view(rows, cols), g, u, dtype, ("pair", dtype, rows, cols))


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(9)
    for seed in range(200):
        cols = rng.choice([rng.randint(1, 100), rng.randrange(8, 20000, 8), 14336, 11008])
        run_case(rng.choice(DTYPES), rng.choice([1, 4, 16, rng.randint(1, 100)]), cols, seed)


@pytest.mark.gpu
def test_ops_and_opcheck_cuda():
    gu = torch.randn(2, 3, 2 * 1000, device="cuda", dtype=torch.bfloat16)
    g, u = gu[..., :1000], gu[..., 1000:]
    assert rel_err(torch.ops.fusedops.silu_mul_cat(gu), exact(g, u)) < 1e-2
    assert rel_err(torch.ops.fusedops.silu_mul(g, u), exact(g, u)) < 1e-2
    torch.library.opcheck(torch.ops.fusedops.silu_mul, (g, u))
    torch.library.opcheck(torch.ops.fusedops.silu_mul_cat, (gu,))


@pytest.mark.gpu
def test_many_rows_walk_grid_y():
    run_case(torch.bfloat16, 70000, 16, 0)


@pytest.mark.gpu
def test_sanitizer_small_cases():
    for dtype in DTYPES:
        for rows, cols in ((3, 64), (2, 37), (1, 5), (2, 1)):
            run_case(dtype, rows, cols, 0)


def test_vector_path_for_contiguous_and_single_odd_rows():
    t = torch.empty(2, 14336, dtype=torch.bfloat16)
    assert silu_mul.vector_ok(t, t, t)
    one = torch.empty(1, 1001, dtype=torch.bfloat16)  # one row: the odd length is the kernel's scalar tail
    assert silu_mul.vector_ok(one, one, one)
    odd = torch.empty(3, 1001, dtype=torch.bfloat16)
    assert not silu_mul.vector_ok(odd, odd, odd)
