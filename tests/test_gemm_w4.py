"""fusedops/ops/gemm_w4.py + csrc/gemv_w4.cu: the int4 projections against float64 math on the
dequantized weight (CPU reference, fake impl, error paths, build: no spills, PTX/SASS instructions and
load order; GPU sweep of every tuning with NaN-poisoned outputs, and CUDA-graph replay)."""
import os
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fusedops import quant
from fusedops.ops import gemm_w4
from fusedops.runtime import compiler
from conftest import capture_graph, poison_, rel_err

OPS = torch.ops.fusedops
MAX_ERR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def problem(m, n, k, dtype, device="cpu", symmetric=False, seed=0, group=128):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    res = torch.randn(m, n, generator=gen).to(dtype)
    return x.to(device), quant.quantize(w.to(device), group, symmetric), res.to(device)


def expected(op, x, q, res):
    """float64 math on the quantized weight's exact value (q - z) * s (on x's device), no rounding anywhere:
    the GEMV multiplies by that value, the dequantize route by it rounded to the model dtype (as does the
    error bar, torch_same_dtype)."""
    y = x.double() @ quant.dequantize(*q, torch.float64).T
    if op == "linear":
        return y
    if op == "linear_residual":
        return res.double() + y
    g, u = y.chunk(2, -1)
    return F.silu(g) * u


def run(op, x, q, res):
    if op == "linear":
        return OPS.linear_w4(x, *q)
    if op == "linear_residual":
        return OPS.linear_residual_w4(x, *q, res)
    return OPS.gate_up_silu_w4(x, *q)


def torch_same_dtype(op, x, q, res):
    """What plain PyTorch in the model dtype gives with the dequantized weight (the error bar)."""
    w = quant.dequantize(*q).to(x.device)
    y = F.linear(x, w)
    if op == "linear":
        return y
    if op == "linear_residual":
        return res + y
    g, u = y.chunk(2, -1)
    return F.silu(g) * u


# ---------------------------------------------------------------- CPU

@pytest.mark.parametrize("op", ["linear", "linear_residual", "gate_up_silu"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_vs_float64(op, symmetric):
    x, q, res = problem(3, 64, 256, torch.bfloat16, symmetric=symmetric)
    out = run(op, x, q, res)
    assert out.shape == (3, 32 if op == "gate_up_silu" else 64) and out.dtype == torch.bfloat16
    assert rel_err(out, expected(op, x, q, res)) < 1e-2


def test_three_dim_input_and_fake():
    x, q, res = problem(6, 64, 256, torch.bfloat16)
    out = OPS.linear_w4(x.view(2, 3, 256), *q)
    assert torch.equal(out.view(6, 64), OPS.linear_w4(x, *q))
    mode = FakeTensorMode()
    fx, fres = mode.from_tensor(x.view(2, 3, 256)), mode.from_tensor(res.view(2, 3, 64))
    fq = [None if t is None else mode.from_tensor(t) for t in q[:3]]
    with mode:
        assert OPS.linear_w4(fx, *fq, 128).shape == (2, 3, 64)
        assert OPS.linear_residual_w4(fx, *fq, 128, fres).shape == (2, 3, 64)
        assert OPS.gate_up_silu_w4(fx, *fq, 128).shape == (2, 3, 32)


def test_errors_name_the_argument():
    x, (qw, s, z, g), res = problem(2, 64, 256, torch.bfloat16)
    cases = [
        ("x", lambda: OPS.linear_w4(x.float(), qw, s, z, g)),
        ("qweight", lambda: OPS.linear_w4(x, qw.to(torch.int64), s, z, g)),
        ("qweight", lambda: OPS.linear_w4(x[:, :128], qw, s, z, g)),
        ("group", lambda: OPS.linear_w4(x, qw, s, z, 100)),
        ("scales", lambda: OPS.linear_w4(x, qw, s.half(), z, g)),
        ("scales", lambda: OPS.linear_w4(x, qw, s[:, :1], z, g)),
        ("zeros", lambda: OPS.linear_w4(x, qw, s, z[:1], g)),
        ("residual", lambda: OPS.linear_residual_w4(x, qw, s, z, g, res[:, :8])),
        ("qweight", lambda: OPS.gate_up_silu_w4(x, qw[:63], s[:63], z[:63], g)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()


def test_kernel_names_route_token_tiles_and_tunings():
    assert [gemm_w4.token_tile(m) for m in (1, 8, 9, 16)] == [8, 8, 16, 16]
    for (kind, tile), tuning in gemm_w4.TUNING.items():
        assert tuning in gemm_w4.TUNINGS[kind, tile]
    for tile, tuning in gemm_w4.WIDE_LINEAR_TUNING.items():
        assert tuning in gemm_w4.TUNINGS["linear", tile]
    # measured: q/k/v (384 CTAs) one wave at 3 CTAs an SM; o_proj / down_proj (256) fit 2 an SM
    assert gemm_w4.default_tuning("linear", 8, 384, 132) == gemm_w4.WIDE_LINEAR_TUNING[8]
    assert gemm_w4.default_tuning("linear", 8, 256, 132) == gemm_w4.TUNING["linear", 8]
    assert gemm_w4.default_tuning("linear", 16, 384, 132) == gemm_w4.WIDE_LINEAR_TUNING[16]
    assert gemm_w4.default_tuning("linear", 16, 256, 132) == gemm_w4.TUNING["linear", 16]
    assert gemm_w4.default_tuning("swiglu", 8, 896, 132) == gemm_w4.TUNING["swiglu", 8]
    assert gemm_w4.kernel_name("swiglu", torch.float16, 3, (16, 1, 1)) == "gemv_w4_swiglu_fp16_m8_w16_u1_b1"
    assert gemm_w4.kernel_name("linear", torch.bfloat16, 9, (4, 2, 4)) == "gemv_w4_linear_bf16_m16_w4_u2_b4"
    with pytest.raises(ValueError, match="^tuning:"):
        gemm_w4.kernel_name("linear", torch.bfloat16, 16, (8, 1, 4))  # compiled for m8 only


def test_groups_below_128_take_the_dequantize_route():
    """The GEMV scales each mma's sums by one group's s: a quad's 128 k must lie in one group."""
    x = torch.randn(2, 256)
    for group, gemv in ((32, False), (64, False), (96, False), (128, True), (256, True)):
        assert (gemm_w4._gemv_input(x, group) is not None) == gemv, group


def _has_cuobjdump():
    return shutil.which("cuobjdump") or os.path.exists(os.path.join(os.path.dirname(compiler.nvcc_path() or ""),
                                                                      "cuobjdump"))


def _first_mma_after(body, load, mma):
    """How many `load`s precede the first `mma` in one kernel's text."""
    return body[:body.index(mma)].count(load)


@pytest.mark.nvcc
def test_build_has_every_tuning_no_spills_and_loads_before_mmas():
    cubin = compiler.build(gemm_w4.SOURCE, "sm_90a")
    log = cubin.with_name(cubin.name + ".log").read_text()
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    wanted = {gemm_w4.kernel_name(kind, dtype, tile, tuning) for (kind, tile), tunings in gemm_w4.TUNINGS.items()
              for dtype in gemm_w4.DTYPES for tuning in tunings}
    assert wanted <= entries, f"missing kernels: {sorted(wanted - entries)}"
    assert len(re.findall(r"\b0 bytes spill stores", log)) == len(entries), "a gemv_w4 kernel spills"
    ptx = compiler.emit_ptx(gemm_w4.SOURCE, "sm_90a")
    sass = compiler.disassemble(cubin) if _has_cuobjdump() else None
    # W loads (2 rows x loads a step) issued before the first mma
    for name, loads in (("gemv_w4_linear_bf16_m8_w8_u2_b2", 4), ("gemv_w4_swiglu_bf16_m8_w4_u2_b3", 8)):
        body = ptx.split(f".entry {name}")[1].split(".entry")[0]
        assert "lop3.b32" in body and "0xea" in body          # (nibbles & mask) | magic in one lop3
        assert "sub.bf16x2" in body                           # (128+q) - (128+z): the exact q - z, paired
        assert "mul.bf16x2" not in body and "fma.rn.f32" in body  # s applied to the fp32 sums, not to W
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in body
        assert "shfl" not in body                             # A and B fragments agree on k without shuffles
        assert _first_mma_after(body, "ld.global.nc.L1::no_allocate.L2::256B.v4.u32", "mma.sync") >= loads, name
        if sass is not None:
            code = sass.split(f"Function : {name}")[1].split("Function :")[0]
            assert "HMMA.16816.F32.BF16" in code and "HMUL2" not in code
            assert _first_mma_after(code, "LDG.E.NA.LTC256B.128", "HMMA") >= loads, f"{name}: W loads after mmas"


# ---------------------------------------------------------------- GPU

def check_case(op, m, n, k, dtype, symmetric, seed, group=128, x_pad=0):
    x, q, res = problem(m, n, k, dtype, "cuda", symmetric, seed, group)
    if x_pad:  # strided rows: x a view into wider rows
        x = torch.cat([x, torch.zeros(m, x_pad, dtype=dtype, device="cuda")], 1)[:, :k]
    ref = expected(op, x, q, res)
    bar = max(2 * rel_err(torch_same_dtype(op, x, q, res), ref), 1e-5)
    out = run(op, x, q, res)
    err = rel_err(out, ref)
    assert err <= bar and err <= MAX_ERR[dtype], (op, m, n, k, dtype, symmetric, group, err, bar)
    if gemm_w4._gemv_input(x, group) is None:  # the dequantize route
        return
    # every compiled tuning, into NaN-poisoned memory (catches unwritten outputs)
    for tuning in gemm_w4.TUNINGS[gemm_w4.KINDS[op], gemm_w4.token_tile(m)]:
        out2 = poison_(torch.empty_like(out))
        gemm_w4.launch_gemv(op, x, q.qweight, q.scales, q.zeros, q.group, out2,
                            res if op == "linear_residual" else None, tuning)
        err = rel_err(out2, ref)
        assert err <= bar and err <= MAX_ERR[dtype], (op, m, n, k, dtype, symmetric, group, tuning, err, bar)


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(6)
    for seed in range(160):
        op = rng.choice(["linear", "linear_residual", "gate_up_silu"])
        m = rng.choice([1, 2, 3, 4, 5, 8, 9, 11, 16, rng.randint(1, 16), rng.randint(17, 80)])
        k = rng.choice([128, 256, 4096, 14336, 128 * rng.randint(1, 40), 32 * rng.randint(1, 40)])
        n = rng.choice([2, 8, 64, 6144, 2 * rng.randint(1, 700)])
        groups = [g for g in (32, 64, 128, 128, 256, 96) if k % g == 0]
        check_case(op, m, n, k, rng.choice([torch.bfloat16, torch.float16]), rng.random() < 0.3, seed,
                   rng.choice(groups), 8 * rng.randint(1, 4) if rng.random() < 0.2 else 0)


@pytest.mark.gpu
def test_dequantize_kernel_is_exact():
    for dtype, symmetric in [(torch.bfloat16, False), (torch.float16, True)]:
        _, q, _ = problem(1, 300, 1024, dtype, "cuda", symmetric)
        assert torch.equal(gemm_w4.dequantize_cuda(*q, dtype).cpu(),
                           quant.dequantize(*(None if t is None else t.cpu() for t in q[:3]), 128))


@pytest.mark.gpu
def test_graph_replay_with_new_inputs():
    x, q, res = problem(4, 4096, 4096, torch.bfloat16, "cuda")
    graph, out = capture_graph(lambda: OPS.linear_residual_w4(x, *q, res))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, expected("linear_residual", x, q, res)) < 1e-2
