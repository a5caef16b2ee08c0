"""fusedops::softmax (last dim): reference vs float64, bad input, PTX, and on the GPU a random sweep over
every variant (warp-per-row, CTA-per-row, online) against float64 with poisoned outputs."""
import random

import pytest
import torch

from conftest import poison_, random_with_outliers, rel_err
from fusedops.ops import softmax
from fusedops.runtime import compiler

op = torch.ops.fusedops.softmax
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def exact(x):
    return torch.softmax(x.double(), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(dtype):
    x = random_with_outliers((6, 300), dtype, "cpu", torch.Generator().manual_seed(0), scale=4.0)
    assert rel_err(op(x), exact(x)) <= MAX_ERR[dtype]


def test_opcheck_cpu():
    torch.library.opcheck(op, (torch.randn(2, 3, 40),))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="^x:"):
        op(torch.randn(3, 4).double())
    with pytest.raises(ValueError, match="^x:"):
        op(torch.tensor(1.0))


def test_variant_choice_by_row_length():
    assert softmax.variant(256, 8, True)[0] == "w1"
    assert softmax.variant(1024, 8, True)[0] == "w4"
    assert softmax.variant(4096, 8, True)[0] == "c1"
    assert softmax.variant(32768, 8, True)[0] == "c8"
    assert softmax.variant(40000, 8, True)[0] == "o"
    assert softmax.variant(33, 8, False)[0] == "o1"


@pytest.mark.nvcc
def test_ptx_has_128bit_access_and_warp_shuffles():
    ptx = compiler.emit_ptx(softmax.SOURCE, "sm_90a")
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx and "shfl.sync.bfly" in ptx


# ---------------------------------------------------------------- GPU

def run_case(dtype, rows, cols, strided, seed, force=None):
    g = torch.Generator().manual_seed(seed)
    x = random_with_outliers((rows, cols + (8 if strided else 0)), dtype, "cuda", g, scale=3.0)[:, :cols]
    out = poison_(torch.empty(rows, cols, dtype=dtype, device="cuda"))
    softmax.launch(x, out, force)
    ref = exact(x)
    err, torch_err = rel_err(out, ref), rel_err(softmax.softmax_reference(x), ref)
    what = (dtype, rows, cols, strided, force, err, torch_err)
    assert err <= max(2 * torch_err, 1e-6) and err <= MAX_ERR[dtype], what


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(21)
    for seed in range(200):
        cols = rng.choice([rng.randint(1, 200), rng.randrange(8, 1100, 8), rng.randrange(8, 40000, 8),
                           rng.choice([32000, 50257, 128256])])
        rows = rng.choice([1, 3, 4, 5, 16, rng.randint(1, 100)]) if cols < 50000 else rng.randint(1, 4)
        run_case(rng.choice(DTYPES), rows, cols, rng.random() < 0.25, seed,
                 "online" if rng.random() < 0.2 else None)


@pytest.mark.gpu
def test_op_on_3d_input_and_opcheck():
    x = torch.randn(2, 7, 1000, device="cuda", dtype=torch.bfloat16)
    assert rel_err(op(x), exact(x)) < 1e-2
    torch.library.opcheck(op, (x,))


@pytest.mark.gpu
def test_sanitizer_small_cases():
    for dtype in DTYPES:
        for rows, cols, force in ((5, 64, None), (3, 1000, None), (2, 4096, None), (2, 40, "online"), (2, 37, None)):
            run_case(dtype, rows, cols, False, 0, force)
