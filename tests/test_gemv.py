"""fusedops GEMV (csrc/gemv.cu, fusedops/ops/gemv.py): nvcc builds every instantiation without spills and
with the promised 16-byte non-caching weight loads and mma.sync, bad input names the argument, and on the
GPU a random sweep of all three epilogues (bf16 and fp16, odd N, K multiples of 8, strided x, M = 1..16)
against an fp32 reference with NaN-poisoned outputs, the GEMM ops' routes and CUDA-graph capture."""
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import fusedops.ops  # noqa: F401
from conftest import capture_graph, poison_, random_with_outliers, rel_err
from fusedops.ops import gemm, gemv
from fusedops.runtime import compiler

ops = torch.ops.fusedops
DTYPES = (torch.bfloat16, torch.float16)


def _has_cuobjdump():
    return shutil.which("cuobjdump") or os.path.exists(os.path.join(os.path.dirname(compiler.nvcc_path() or ""),
                                                                      "cuobjdump"))


# ---------------------------------------------------------------- CPU: build, instructions, errors

@pytest.mark.nvcc
def test_nvcc_builds_every_tuning_without_spills_and_with_streaming_loads_and_mma():
    cubin = compiler.build(gemv.SOURCE, "sm_90a")
    log = cubin.with_name(cubin.name + ".log").read_text()
    entries = set(re.findall(r"Compiling entry function '(\w+)'", log))
    wanted = {gemv.kernel_name(kind, dtype, m, tuning) for kind, tunings in gemv.TUNINGS.items()
              for dtype in DTYPES for m in (1, 16) for tuning in tunings}
    assert wanted <= entries, f"missing kernels: {sorted(wanted - entries)}"
    assert len(re.findall(r"\b0 bytes spill stores", log)) == len(entries), "a GEMV kernel spills"
    if _has_cuobjdump():
        sass = compiler.disassemble(cubin)
        assert "LDG.E.NA.LTC256B.128.CONSTANT" in sass, "no 16-byte non-caching weight loads"
        assert "HMMA.16816.F32.BF16" in sass and "HMMA.16816.F32" in sass
        # A step's loads are all issued before its first mma (8 warps x 4: 8 W + 4 x loads a thread).
        body = sass.split("Function : gemv_linear_bf16_m8_w8_u4")[1].split("Function :")[0]
        first_mma = body.index("HMMA")
        assert body[:first_mma].count("LDG.E.NA.LTC256B.128") >= 8, "weight loads interleaved with the mmas"
    else:  # the CPU box has no cuobjdump: check the PTX the SASS comes from
        ptx = compiler.emit_ptx(gemv.SOURCE, "sm_90a")
        assert "ld.global.nc.L1::no_allocate.L2::256B.v4.u32" in ptx
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx


def _cpu(m=2, n=24, k=64, dtype=torch.bfloat16):
    return torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)


@pytest.mark.parametrize("call, arg", [
    (lambda: gemv.gemv_linear(*_cpu(dtype=torch.float32)), "x"),
    (lambda: gemv.gemv_linear(_cpu()[0], _cpu()[1].half()), "weight"),
    (lambda: gemv.gemv_linear(_cpu(m=17)[0], _cpu()[1]), "x"),
    (lambda: gemv.gemv_linear(*_cpu(k=60)), "x"),
    (lambda: gemv.gemv_linear(_cpu()[0], _cpu(k=72)[1]), "weight"),
    (lambda: gemv.gemv_linear(_cpu()[0].t().contiguous().t(), _cpu()[1]), "x"),
    (lambda: gemv.gemv_linear(*_cpu(), bias=torch.randn(23).bfloat16()), "bias"),
    (lambda: gemv.gemv_linear(*_cpu(), residual=torch.randn(2, 23).bfloat16()), "residual"),
    (lambda: gemv.gemv_gate_up_silu(*_cpu(n=64), block=8), "block"),
    (lambda: gemv.gemv_gate_up_silu(*_cpu(n=96), block=32), "block"),
    (lambda: gemv.gemv_gate_up_silu(_cpu(n=64)[0], _cpu(n=64)[1][:, :56], block=16), "w_gate_up"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call()


def test_kernel_name_picks_the_token_tile_and_rejects_unbuilt_tunings():
    assert gemv.kernel_name("linear", torch.bfloat16, 8, (8, 4)) == "gemv_linear_bf16_m8_w8_u4"
    assert gemv.kernel_name("swiglu", torch.float16, 9, (4, 4)) == "gemv_swiglu_fp16_m16_w4_u4"
    with pytest.raises(ValueError, match="^tuning:"):
        gemv.kernel_name("swiglu", torch.bfloat16, 1, (16, 4))


def test_gemm_ops_send_only_decode_sizes_the_gemv_can_take():
    x, w = _cpu(m=4, n=32, k=64)
    assert gemv.linear_problem(x, w) is None
    assert gemv.gate_up_problem(x, w, 16) is None
    assert gemv.linear_problem(torch.randn(17, 64).bfloat16(), w)            # M too large: ROUTES decide
    assert gemv.linear_problem(x.float(), w.float())                         # fp32: cuBLAS
    assert gemv.gate_up_problem(x, w, 8)                                     # block not a multiple of 16
    assert "N = 0" in gemv.linear_problem(x, w[:0])                          # nothing to launch: cuBLAS
    assert all(v == gemv.MAX_M for v in gemm.GEMV_MAX_M.values())


# ---------------------------------------------------------------- GPU

def _inputs(m, n, k, dtype, seed, x_stride=None):
    g = torch.Generator().manual_seed(seed)
    x = random_with_outliers((m, x_stride or k), dtype, "cuda", g)[:, :k]
    w = random_with_outliers((n, k), dtype, "cuda", g, scale=k ** -0.5)
    return x, w


def _torch_swiglu(x, w_gate_up, block):
    """PyTorch's own same-dtype SwiGLU, every op rounded as HF's LlamaMLP runs it."""
    g, u = gemm.split_gate_up(w_gate_up, block)
    return F.silu(F.linear(x, g)) * F.linear(x, u)


def _check(out, ref, torch_out):
    """FA2's rule: the kernel's error vs fp32 at most twice PyTorch's own same-dtype error (floor 1e-5)."""
    err, torch_err = rel_err(out, ref), rel_err(torch_out, ref)
    assert err <= 2 * torch_err + 1e-5, f"rel err {err:.2e} vs torch {torch_err:.2e}"


LINEAR_SHAPES = [(1, 1, 8), (2, 7, 40), (3, 16, 4096), (5, 100, 136), (8, 1000, 264), (9, 17, 520),
                 (13, 4097, 1032), (16, 6144, 4096), (16, 33, 14336), (4, 4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", LINEAR_SHAPES)
@pytest.mark.parametrize("epilogue", ["plain", "bias", "residual"])
def test_linear_matches_fp32(dtype, m, n, k, epilogue):
    x, w = _inputs(m, n, k, dtype, seed=m * n + k, x_stride=k + 8 * (m % 3))
    g = torch.Generator().manual_seed(n)
    bias = random_with_outliers((n,), dtype, "cuda", g) if epilogue == "bias" else None
    res = random_with_outliers((m, n), dtype, "cuda", g) if epilogue == "residual" else None
    ref = x.float() @ w.float().T + (bias.float() if bias is not None else 0) + (res.float() if res is not None else 0)
    torch_out = F.linear(x, w, bias) + (res if res is not None else 0)
    for tuning in gemv.TUNINGS["linear"]:
        out = poison_(torch.empty(m, n, dtype=dtype, device="cuda"))
        gemv.gemv_linear(x, w, bias, res, out=out, tuning=tuning)
        _check(out, ref, torch_out)


GATE_UP_SHAPES = [(1, 16, 8, 16), (2, 48, 72, 16), (7, 256, 4096, 128), (8, 384, 136, 128), (11, 96, 1032, 96),
                  (16, 1024, 4096, 1024), (16, 14336, 4096, 128), (3, 512, 14336, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, inter, k, block", GATE_UP_SHAPES)
def test_gate_up_silu_matches_fp32(dtype, m, inter, k, block):
    x, w_gate = _inputs(m, inter, k, dtype, seed=inter + m)
    _, w_up = _inputs(1, inter, k, dtype, seed=inter + m + 1)
    w = gemm.prepare_gate_up(w_gate, w_up, block)
    xf = x.float()
    ref = F.silu(xf @ w_gate.float().T) * (xf @ w_up.float().T)
    torch_out = _torch_swiglu(x, w, block)
    for tuning in gemv.TUNINGS["swiglu"]:
        out = poison_(torch.empty(m, inter, dtype=dtype, device="cuda"))
        gemv.gemv_gate_up_silu(x, w, block, out=out, tuning=tuning)
        _check(out, ref, torch_out)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_gemm_ops_route_decode_sizes_to_the_gemv(m):
    k, n, inter = 512, 6144 // 8, 1024
    x, w = _inputs(m, n, k, torch.bfloat16, seed=m)
    x = x.view(1, m, k)
    res = random_with_outliers((1, m, n), torch.bfloat16, "cuda", torch.Generator().manual_seed(m))
    _, w_gate = _inputs(1, inter, k, torch.bfloat16, seed=m + 1)
    _, w_up = _inputs(1, inter, k, torch.bfloat16, seed=m + 2)
    w_gu = gemm.prepare_gate_up(w_gate, w_up, gemm.GATE_UP_BLOCK)
    xf = x.float()
    _check(ops.linear(x, w, None), xf @ w.float().T, F.linear(x, w))
    _check(ops.linear_residual(x, w, res), xf @ w.float().T + res.float(), res + F.linear(x, w))
    out = ops.gate_up_silu(x, w_gu, gemm.GATE_UP_BLOCK)
    assert out.shape == (1, m, inter)
    _check(out, F.silu(xf @ w_gate.float().T) * (xf @ w_up.float().T),
           _torch_swiglu(x, w_gu, gemm.GATE_UP_BLOCK))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_captures_in_cuda_graphs(m):
    k, n = 1024, 520
    x, w = _inputs(m, n, k, torch.bfloat16, seed=5)
    res = random_with_outliers((m, n), torch.bfloat16, "cuda", torch.Generator().manual_seed(6))
    w_gu = gemm.prepare_gate_up(w[:512], w[:512].flip(0).contiguous(), 128)

    def run():
        return (gemv.gemv_linear(x, w), gemv.gemv_linear(x, w, residual=res), gemv.gemv_gate_up_silu(x, w_gu, 128))

    graph, outs = capture_graph(run)
    for o in outs:
        poison_(o)
    x.copy_(random_with_outliers((m, k), torch.bfloat16, "cuda", torch.Generator().manual_seed(7)))
    graph.replay()
    torch.cuda.synchronize()
    xf = x.float()
    _check(outs[0], xf @ w.float().T, F.linear(x, w))
    _check(outs[1], xf @ w.float().T + res.float(), res + F.linear(x, w))
    _check(outs[2], F.silu(xf @ w[:512].float().T) * (xf @ w[:512].flip(0).float().T),
           _torch_swiglu(x, w_gu, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [8, 24, 40, 264])
def test_partial_steps_ignore_nan_memory_past_the_rows(dtype, k):
    """The last step's out-of-range lanes must not multiply whatever lies past a row (Inf/NaN) by 0."""
    n, m = 48, 3
    x, w = _inputs(m, n, k, dtype, seed=k)
    storage = torch.full((n + 8, k), float("nan"), dtype=dtype, device="cuda")
    storage[:n] = w
    w_in_nan = storage[:n]
    ref = x.float() @ w.float().T
    for tuning in gemv.TUNINGS["linear"]:
        out = poison_(torch.empty(m, n, dtype=dtype, device="cuda"))
        gemv.gemv_linear(x, w_in_nan, out=out, tuning=tuning)
        assert not out.isnan().any()
        _check(out, ref, F.linear(x, w))
    # SwiGLU: [Wg; Wu] of 16 rows each (block 16), NaN right after it
    storage = torch.full((32 + 8, k), float("nan"), dtype=dtype, device="cuda")
    storage[:32] = w[:32]
    w_gu = storage[:32]
    ref = F.silu(x.float() @ w[:16].float().T) * (x.float() @ w[16:32].float().T)
    out = gemv.gemv_gate_up_silu(x, w_gu, 16)
    assert not out.isnan().any()
    _check(out, ref, _torch_swiglu(x, w[:32], 16))


def test_device_tunings_are_compiled_and_picked_by_device_name(monkeypatch):
    for kinds in gemv.DEVICE_TUNING.values():
        for (kind, tile), tuning in kinds.items():
            assert tuning in gemv.TUNINGS[kind] and tile in (8, 16)
    gemv._device_table.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    assert gemv.default_tuning("swiglu", 1, torch.device("cuda", 0)) == (8, 2)
    assert gemv.default_tuning("swiglu", 16, torch.device("cuda", 0)) == (4, 4)
    assert gemv.default_tuning("linear", 8, torch.device("cuda", 0)) == (16, 2)
    for other in ("NVIDIA H100 80GB HBM3", "NVIDIA GH200 480GB", "NVIDIA H200 MIG 3g.71gb"):
        gemv._device_table.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None, name=other: name)
        assert gemv.default_tuning("swiglu", 1, torch.device("cuda", 0)) == gemv.TUNING["swiglu"], other
    gemv._device_table.cache_clear()
