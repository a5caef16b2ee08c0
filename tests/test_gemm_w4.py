"""fusedops/ops/gemm_w4.py + csrc/gemv_w4.cu: the int4 projections against float64 math on the
dequantized weight (CPU reference, fake impl, error paths, PTX; GPU sweep and CUDA-graph replay)."""
import random

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
    q = quant.quantize(w, group, symmetric)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return x.to(device), quant.QuantizedWeight(to(q.qweight), to(q.scales), to(q.zeros), group), res.to(device)


def expected(op, x, q, res):
    """float64 math on the dequantized weight, HF's rounding of each product to the model dtype."""
    w = quant.dequantize(*q).double().cpu()
    y = x.double().cpu() @ w.T
    if op == "linear":
        return y
    if op == "linear_residual":
        return res.double().cpu() + y.to(x.dtype).double()
    g, u = y.chunk(2, -1)
    return F.silu(g.to(x.dtype).double()) * u.to(x.dtype).double()


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


def test_m_tile_routing():
    assert [gemm_w4.m_tile(m) for m in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]


@pytest.mark.nvcc
def test_ptx_unpacks_in_registers():
    ptx = compiler.emit_ptx(gemm_w4.SOURCE, "sm_90a")
    body = ptx.split(".entry gemv_w4_linear_bf16_m1")[1].split(".entry")[0]
    assert "lop3.b32" in body and "0xea" in body          # (nibbles & mask) | magic in one lop3
    assert "sub.bf16x2" in body and "mul.bf16x2" in body  # (128+q) - (128+z), times s: paired bf16
    assert "ld.global.nc.v4" in body                      # 16-byte weight and x loads
    assert "shfl.sync.bfly" in body and "fma.rn.f32" in body


# ---------------------------------------------------------------- GPU

def check_case(op, m, n, k, dtype, symmetric, seed, group=128):
    x, q, res = problem(m, n, k, dtype, "cuda", symmetric, seed, group)
    ref = expected(op, x, q, res)
    out = run(op, x, q, res)
    torch_err = rel_err(torch_same_dtype(op, x, q, res), ref)
    err = rel_err(out, ref)
    assert err <= max(2 * torch_err, 1e-5) and err <= MAX_ERR[dtype], (op, m, n, k, dtype, symmetric, err, torch_err)
    # the same again into NaN-poisoned memory through the launcher (catches unwritten outputs)
    if m <= gemm_w4.MAX_GEMV_TOKENS:
        out2 = poison_(torch.empty_like(out))
        gemm_w4.launch_gemv(op, x, q.qweight, q.scales, q.zeros, q.group, out2, res if op == "linear_residual" else None)
        assert torch.equal(out2, out), (op, m, n, k)


@pytest.mark.gpu
def test_random_sweep_vs_float64():
    rng = random.Random(6)
    for seed in range(160):
        op = rng.choice(["linear", "linear_residual", "gate_up_silu"])
        m = rng.choice([1, 2, 3, 4, 5, 8, 11, 16, rng.randint(17, 80)])
        k = rng.choice([128, 256, 4096, 14336, 128 * rng.randint(1, 40)])
        n = rng.choice([2, 8, 64, 6144, 2 * rng.randint(1, 700)])
        check_case(op, m, n, k, rng.choice([torch.bfloat16, torch.float16]), rng.random() < 0.3, seed,
                   rng.choice([128, 128, 64, 256]) if k % 256 == 0 else 128)


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
