"""fusedops::transpose (last two dims, batched): exact against torch, bad input, the kernel's shared-memory
staging in PTX, and on the GPU a random sweep (odd sizes, strided rows) with poisoned outputs."""
import random

import pytest
import torch

from conftest import poison_
from fusedops.ops import transpose
from fusedops.runtime import compiler

op = torch.ops.fusedops.transpose
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def test_reference_and_fake_shapes():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(op(x), x.transpose(-2, -1))
    torch.library.opcheck(op, (x,))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="^x:"):
        op(torch.randn(5))
    with pytest.raises(ValueError, match="^x:"):
        op(torch.ones(3, 4, dtype=torch.int64))


@pytest.mark.nvcc
def test_ptx_stages_tiles_through_shared_memory():
    ptx = compiler.emit_ptx(transpose.SOURCE, "sm_90a")
    assert "st.shared" in ptx and "ld.shared" in ptx and "bar.sync" in ptx
    wide = ptx[ptx.index(".entry transpose_bf16_wide"):ptx.index(".entry transpose_bf16_narrow")]
    assert "ld.global.v2.u16" in wide and "st.global.v2.u16" in wide  # one 4-byte access moves two bf16


# ---------------------------------------------------------------- GPU

def run_case(dtype, batch, m, n, strided, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, m, n + (6 if strided else 0), generator=g).to(dtype).cuda()[..., :n]
    out = poison_(torch.empty(batch, n, m, dtype=dtype, device="cuda"))
    transpose.launch(x, out)
    assert torch.equal(out, x.transpose(-2, -1)), (dtype, batch, m, n, strided)


@pytest.mark.gpu
def test_random_sweep_exact():
    rng = random.Random(41)
    for seed in range(200):
        m = rng.choice([1, 2, rng.randint(1, 300), rng.randrange(64, 2048, 64), 4096])
        n = rng.choice([1, 3, rng.randint(1, 300), rng.randrange(64, 2048, 64), 4096])
        batch = rng.choice([1, 1, 2, 5]) if m * n > 1 << 20 else rng.choice([1, 3, 8])
        run_case(rng.choice(DTYPES), batch, m, n, rng.random() < 0.25, seed)


@pytest.mark.gpu
def test_op_on_4d_and_transposed_view():
    x = torch.randn(2, 3, 130, 65, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(op(x), x.transpose(-2, -1).contiguous())
    xt = x.transpose(-2, -1)  # non-unit last stride: copied first
    assert torch.equal(op(xt), x)
    torch.library.opcheck(op, (x,))


@pytest.mark.gpu
def test_sanitizer_small_cases():
    for dtype in DTYPES:
        for batch, m, n, strided in ((2, 64, 64, False), (3, 65, 130, True), (1, 1, 7, False), (2, 33, 31, False)):
            run_case(dtype, batch, m, n, strided, 0)
