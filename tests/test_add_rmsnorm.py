"""fusedops::add_rms_norm: h rounded as HF rounds it, the norm of the unrounded sum, bad input, PTX, and
on the GPU a random sweep against float64 with poisoned outputs."""
import random

import pytest
import torch

from conftest import poison_, random_with_outliers, rel_err
from fusedops.ops import add_rmsnorm, rmsnorm
from fusedops.runtime import compiler

op = torch.ops.fusedops.add_rms_norm
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def exact(x, residual, w, eps):
    """Float64 truth: no rounding of h, no rounding before the weight."""
    h = x.double() + residual.double()
    return w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), h


def test_reference_rounds_h_as_hf_and_normalizes_the_unrounded_sum():
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(64, 512, generator=g).bfloat16() for _ in range(2))
    r = r * 8   # a residual stream larger than the update, as deep in a model
    w = (1 + 0.1 * torch.randn(512, generator=g)).bfloat16()
    y, h = op(x, r, w, 1e-5)
    assert torch.equal(h, r + x)                                     # HF's residual, bit for bit
    total = r.float() + x.float()
    assert torch.equal(y, torch.ops.fusedops.rms_norm(total, w.float(), 1e-5).bfloat16())
    y64, _ = exact(x, r, w, 1e-5)
    eager_order = torch.ops.fusedops.rms_norm(r + x, w, 1e-5)       # norm of the rounded h
    assert rel_err(y, y64) < 0.8 * rel_err(eager_order, y64)


def test_fp32_h_is_the_unrounded_sum_and_an_fp32_residual_is_read_as_is():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 256, generator=g).bfloat16(), (1 + 0.1 * torch.randn(256, generator=g)).bfloat16()
    r32 = 8 * torch.randn(8, 256, generator=g)            # an fp32 stream, not representable in bf16
    y, h = op(x, r32, w, 1e-5, True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert torch.equal(h, r32 + x.float())
    assert torch.equal(y, torch.ops.fusedops.rms_norm(r32 + x.float(), w.float(), 1e-5).bfloat16())
    y2, h2 = op(x, r32, w, 1e-5)                          # fp32 residual in, model-dtype h out
    assert torch.equal(y2, y) and h2.dtype == torch.bfloat16 and torch.equal(h2, h.bfloat16())
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake_y, fake_h = op(mode.from_tensor(x), mode.from_tensor(x), mode.from_tensor(w), 1e-5, True)
    assert fake_h.dtype == torch.float32 and fake_y.dtype == torch.bfloat16


def test_opcheck_cpu():
    torch.library.opcheck(op, (torch.randn(2, 3, 32), torch.randn(2, 3, 32), torch.randn(32), 1e-6))
    x = torch.randn(2, 3, 32).bfloat16()
    torch.library.opcheck(op, (x, torch.randn(2, 3, 32), torch.randn(32).bfloat16(), 1e-6, True))


@pytest.mark.parametrize("x, r, w, arg", [
    (torch.randn(2, 8), torch.randn(2, 8).half(), torch.randn(8), "residual"),
    (torch.randn(2, 8).bfloat16(), torch.randn(2, 8).half(), torch.randn(8).bfloat16(), "residual"),
    (torch.randn(2, 8), torch.randn(2, 7), torch.randn(8), "residual"),
    (torch.randn(2, 8), torch.randn(2, 8), torch.randn(9), "weight"),
    (torch.randn(2, 8).double(), torch.randn(2, 8).double(), torch.randn(8).double(), "x"),
])
def test_bad_input_names_the_argument(x, r, w, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        op(x, r, w, 1e-6)


@pytest.mark.nvcc
def test_ptx_has_128bit_access_and_warp_shuffles():
    ptx = compiler.emit_ptx(add_rmsnorm.SOURCE, "sm_90a")
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx and "shfl.sync.bfly" in ptx
    # every name kernel_plan can pick exists, and the fp32-stream ones read and write fp32 16 bytes at a time
    for io in ("", "_h32", "_r32", "_r32h32"):
        for variant in ("c1", "c2", "c4", "sv", "s1"):
            assert f".entry add_rmsnorm_bf16_{variant}{io}(" in ptx
    body = ptx[ptx.index(".entry add_rmsnorm_bf16_c1_r32h32("):]
    body = body[:body.index("\n}\n")]
    assert "ld.global.v4.f32" in body and "st.global.v4.f32" in body


# ---------------------------------------------------------------- GPU

def run_case(dtype, rows, hidden, strided, seed, items=None, r32=False, h32=False):
    """r32 / h32: residual / h in fp32 (the fp32 residual stream; 16-bit x only)."""
    g = torch.Generator().manual_seed(seed)
    pad = 8 if strided else 0
    x = random_with_outliers((rows, hidden + pad), dtype, "cuda", g)[:, :hidden]
    r = random_with_outliers((rows, hidden), torch.float32 if r32 else dtype, "cuda", g, scale=3.0)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).cuda()
    y = poison_(torch.empty(rows, hidden, dtype=dtype, device="cuda"))
    h = poison_(torch.empty(rows, hidden, dtype=torch.float32 if h32 else dtype, device="cuda"))
    add_rmsnorm.launch(x, r, w, y, h, 1e-6, items)
    y_ref, h_ref = exact(x, r, w, 1e-6)
    y_torch, h_torch = add_rmsnorm.add_rms_norm_reference(x, r, w, 1e-6, h32)
    assert torch.equal(h, h_torch), (dtype, rows, hidden)
    assert rel_err(y, y_torch) <= MAX_ERR[dtype] / 4, (dtype, rows, hidden)   # same fp32 maths, one rounding
    err, torch_err = rel_err(y, y_ref), rel_err(y_torch, y_ref)
    assert err <= max(2 * torch_err, 1e-6) and err <= MAX_ERR[dtype], (dtype, rows, hidden, strided, err, torch_err)


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(77)
    for seed in range(200):
        dtype = rng.choice(DTYPES)
        hidden = rng.choice([rng.randint(1, 300), rng.randrange(8, 9000, 8),
                             rng.choice([2048, 4096, 5120, 8192, 70016])])
        rows = rng.choice([1, 4, 16, rng.randint(1, 200)])
        half = dtype != torch.float32
        run_case(dtype, rows, hidden, rng.random() < 0.25, seed,
                 r32=half and rng.random() < 0.5, h32=half and rng.random() < 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("r32, h32", [(False, True), (True, False), (True, True)])
def test_fp32_residual_stream_variants(r32, h32):
    """Every kernel variant (cached c1/c2/c4, streaming 16-byte, scalar) with an fp32 residual and/or h."""
    for dtype in (torch.bfloat16, torch.float16):
        for items in rmsnorm.CACHED_ITEMS:
            run_case(dtype, 5, 2048, False, items, items, r32, h32)
        for rows, hidden, strided in ((3, 70016, False), (4, 37, False), (2, 4096, True)):
            run_case(dtype, rows, hidden, strided, hidden, None, r32, h32)


@pytest.mark.gpu
@pytest.mark.parametrize("items", rmsnorm.CACHED_ITEMS)
def test_every_cached_variant(items):
    for dtype in DTYPES:
        run_case(dtype, 5, 2048, False, items, items)


@pytest.mark.gpu
def test_op_matches_eager_pair_and_opcheck():
    x, r = (torch.randn(2, 5, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    y, h = op(x, r, w, 1e-5)
    y_ref, h_ref = add_rmsnorm.add_rms_norm_reference(x, r, w, 1e-5)
    assert torch.equal(h, h_ref)
    assert rel_err(y, y_ref) < 1e-2
    torch.library.opcheck(op, (x, r, w, 1e-5))


@pytest.mark.gpu
def test_op_carries_an_fp32_stream_on_cuda():
    x, w = torch.randn(3, 7, 4096, device="cuda").bfloat16(), torch.randn(4096, device="cuda").bfloat16()
    r32 = 8 * torch.randn(3, 7, 4096, device="cuda")
    y, h = op(x, r32, w, 1e-5, True)
    assert h.dtype == torch.float32 and torch.equal(h, r32 + x.float())
    y_ref, _ = add_rmsnorm.add_rms_norm_reference(x, r32, w, 1e-5, True)
    assert rel_err(y, y_ref) < 1e-2
    torch.library.opcheck(op, (x, r32, w, 1e-5, True))


@pytest.mark.gpu
def test_sanitizer_small_cases():
    for dtype in DTYPES:
        for rows, hidden, strided in ((3, 64, False), (2, 40, True), (2, 37, False), (1, 70016, False)):
            run_case(dtype, rows, hidden, strided, 0)


def test_kernel_plan_takes_the_vector_path_for_contiguous_rows():
    x, r, y, h = (torch.empty(16, 4096, dtype=torch.bfloat16) for _ in range(4))
    assert add_rmsnorm.kernel_plan(x, r, torch.empty(4096, dtype=torch.bfloat16), y, h) == ("add_rmsnorm_bf16_c1", 512)


def test_kernel_plan_names_the_fp32_stream_variants_and_falls_back_when_misaligned():
    x, y = torch.empty(4, 4096, dtype=torch.bfloat16), torch.empty(4, 4096, dtype=torch.bfloat16)
    w, f32 = torch.empty(4096, dtype=torch.bfloat16), torch.empty(4, 4096)
    assert add_rmsnorm.kernel_plan(x, x, w, y, f32)[0] == "add_rmsnorm_bf16_c1_h32"
    assert add_rmsnorm.kernel_plan(x, f32, w, y, x)[0] == "add_rmsnorm_bf16_c1_r32"
    assert add_rmsnorm.kernel_plan(x, f32, w, y, f32)[0] == "add_rmsnorm_bf16_c1_r32h32"
    shifted = torch.empty(4 * 4096 + 4)[4:].view(4, 4096)      # 16- but not 32-byte aligned fp32 rows
    assert add_rmsnorm.kernel_plan(x, shifted, w, y, f32)[0] == "add_rmsnorm_bf16_s1_r32h32"
