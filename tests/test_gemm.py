"""fusedops GEMM ops: CPU references vs float64 math, the gate/up weight layout, bad input, the
generated CUTLASS instantiations (table in sync, nvcc builds them, HGMMA in the SASS, C ABI agrees
with Python), and on the H100 every variant and every dispatch route against an fp32 reference."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import fusedops.ops  # noqa: F401
from conftest import capture_graph, poison_, random_with_outliers, rel_err
from fusedops import gemm_codegen
from fusedops.gemm_codegen import VARIANTS, Variant
from fusedops.ops import gemm
from fusedops.runtime import compiler

ops = torch.ops.fusedops
BF16_MAX_ERR = 1e-2
SWIGLU = [v for v in VARIANTS if v.epilogue == "swiglu"]
LINEAR = [v for v in VARIANTS if v.epilogue == "linear"]


def exact_swiglu(x, w_gate, w_up):
    x = x.double()
    g, u = x @ w_gate.double().T, x @ w_up.double().T
    return g * torch.sigmoid(g) * u


def weights(n, k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return random_with_outliers((n, k), dtype, device, g, scale=k ** -0.5)


# ---------------------------------------------------------------- CPU: references and layout

@pytest.mark.parametrize("block", [1, 8, 32, 96])
def test_prepare_gate_up_interleaves_blocks_and_splits_back(block):
    w_gate, w_up = torch.randn(96, 16), torch.randn(96, 16)
    w = gemm.prepare_gate_up(w_gate, w_up, block)
    assert torch.equal(w[:block], w_gate[:block]) and torch.equal(w[block:2 * block], w_up[:block])
    g, u = gemm.split_gate_up(w, block)
    assert torch.equal(g, w_gate) and torch.equal(u, w_up)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_MAX_ERR)])
@pytest.mark.parametrize("block", [16, 128])
def test_gate_up_silu_reference_matches_float64(dtype, tol, block):
    x = random_with_outliers((2, 5, 64), dtype, "cpu", torch.Generator().manual_seed(1))
    w_gate, w_up = weights(256, 64, dtype, seed=2), weights(256, 64, dtype, seed=3)
    out = ops.gate_up_silu(x, gemm.prepare_gate_up(w_gate, w_up, block), block)
    assert out.shape == (2, 5, 256)
    assert rel_err(out, exact_swiglu(x, w_gate, w_up)) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_MAX_ERR)])
def test_linear_and_residual_references_match_float64(dtype, tol):
    g = torch.Generator().manual_seed(4)
    x = random_with_outliers((3, 7, 64), dtype, "cpu", g)
    w = weights(40, 64, dtype, seed=5)
    res = random_with_outliers((3, 7, 40), dtype, "cpu", g)
    assert rel_err(ops.linear(x, w, None), x.double() @ w.double().T) <= tol
    assert rel_err(ops.linear_residual(x, w, res), x.double() @ w.double().T + res.double()) <= tol


def test_opcheck_cpu():
    x, w = torch.randn(3, 16), torch.randn(24, 16)
    torch.library.opcheck(ops.linear, (x, w, torch.randn(24)))
    torch.library.opcheck(ops.linear_residual, (x, w, torch.randn(3, 24)))
    torch.library.opcheck(ops.gate_up_silu, (x, torch.randn(32, 16), 8))


@pytest.mark.parametrize("call, arg", [
    (lambda: ops.linear(torch.ones(2, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32)), "x"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 7)), "weight"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8).double()), "weight"),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "bias"),
    (lambda: ops.linear_residual(torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 5)), "residual"),
    (lambda: ops.gate_up_silu(torch.randn(2, 8), torch.randn(12, 8), 4), "block"),
    (lambda: ops.gate_up_silu(torch.randn(2, 8), torch.randn(16, 8), 0), "block"),
    (lambda: gemm.prepare_gate_up(torch.randn(8, 4), torch.randn(8, 4), 3), "block"),
    (lambda: gemm.prepare_gate_up(torch.randn(8, 4), torch.randn(8, 5), 4), "w_up"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call()


def _route(epilogue):
    return gemm.Route(1 << 30, next(v.name for v in VARIANTS if v.epilogue == epilogue))


@pytest.mark.parametrize("call, arg, what", [
    (lambda: gemm.cutlass_linear(torch.randn(16, 64).half(), torch.randn(64, 64).half(), None, _route("linear")),
     "x", "dtype"),
    (lambda: gemm.cutlass_linear(torch.randn(16, 64).bfloat16(), torch.randn(64, 64), None, _route("linear")),
     "weight", "dtype"),
    (lambda: gemm.cutlass_linear(torch.randn(16 * 64 + 1).bfloat16()[1:].view(16, 64),
                                 torch.randn(64, 64).bfloat16(), None, _route("linear")), "x", "16-byte"),
    (lambda: gemm.cutlass_linear(torch.randn(16, 68).bfloat16(), torch.randn(64, 68).bfloat16(),
                                 None, _route("linear")), "x", "16-byte"),
    (lambda: gemm.cutlass_linear(torch.randn(16, 64).bfloat16(), torch.randn(64, 64).bfloat16().T,
                                 None, _route("linear")), "weight", "unit last stride"),
    (lambda: gemm.cutlass_linear(torch.randn(16, 64).bfloat16(), torch.randn(64, 64).bfloat16(),
                                 None, _route("swiglu")), "route", "linear"),
    (lambda: gemm.cutlass_gate_up_silu(torch.randn(16, 64).bfloat16(), torch.randn(512, 64).bfloat16(),
                                       64, _route("swiglu")), "block", "half"),
    (lambda: gemm.cutlass_linear(torch.randn(16, 64).bfloat16(), torch.randn(64, 64).bfloat16(),
                                 None, _route("linear")), "x", "CUDA"),
])
def test_cutlass_entry_points_reject_what_tma_cannot_read(call, arg, what):
    with pytest.raises(ValueError, match=f"^{arg}:.*{what}"):
        call()


# ---------------------------------------------------------------- CPU: the instantiation table

def test_generated_sources_match_the_table():
    assert gemm_codegen.stale() == [], "run `python -m fusedops.gemm_codegen` and commit templates/generated"


def test_table_is_small_unique_and_shares_the_swiglu_block():
    assert len(VARIANTS) <= 6
    assert len({v.name for v in VARIANTS}) == len(VARIANTS)
    assert {v.tile[1] // 2 for v in SWIGLU} == {gemm.GATE_UP_BLOCK}
    assert all(r.variant is None or r.variant in gemm.SOURCES for rs in gemm.ROUTES.values() for r in rs)
    assert all(rs[-1].max_m >= 1 << 40 and rs[-1].max_k >= 1 << 40 for rs in gemm.ROUTES.values()), \
        "every (M, K) needs a route"
    assert gemm.route_for("linear_residual", 2048, 14336).variant is None  # down_proj stays on cuBLAS


@pytest.mark.parametrize("kwargs, arg", [
    (dict(epilogue="gelu"), "epilogue"), (dict(schedule="fast"), "schedule"),
    (dict(schedule="pingpong", scheduler="streamk"), "scheduler"), (dict(dtype="fp16"), "dtype"),
])
def test_variant_rejects_what_the_template_cannot_build(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        Variant(**{"epilogue": "linear", "tile": (128, 128, 64), "cluster": (1, 1), **kwargs})


def _one_per_epilogue():
    return [SWIGLU[0], LINEAR[0]]


def _has_cuobjdump():
    return shutil.which("cuobjdump") or os.path.exists(os.path.join(os.path.dirname(compiler.nvcc_path() or ""),
                                                                      "cuobjdump"))


@pytest.mark.nvcc
@pytest.mark.parametrize("variant", _one_per_epilogue(), ids=lambda v: v.epilogue)
def test_nvcc_builds_the_instantiation_with_wgmma_tma_and_the_c_abi(variant):
    """1-4 minutes per variant on the 2-core box unless FUSEDOPS_CACHE already holds it."""
    src = gemm.SOURCES[variant.name]
    so = compiler.build(src, gemm.CUTLASS_ARCH)
    log = so.with_name(so.name + ".log").read_text()
    assert "0 bytes spill stores" in log
    if _has_cuobjdump():
        sass = compiler.disassemble(so)
        assert f"HGMMA.64x{variant.tile[1]}x16.F32.BF16" in sass, "no wgmma spanning the tile's N"
        assert "UTMALDG" in sass, "no TMA loads"
    else:  # the CPU box has no cuobjdump: check the PTX the SASS comes from
        ptx = compiler.emit_ptx(src, gemm.CUTLASS_ARCH)
        assert f"wgmma.mma_async.sync.aligned.m64n{variant.tile[1]}k16.f32.bf16.bf16" in ptx
        assert "cp.async.bulk.tensor.3d" in ptx
    lib = gemm.library(variant.name)  # loads without a GPU; checks the args size and the table
    cfg = gemm.variant_config(lib)
    assert cfg["stages"] >= 3 and cfg["smem_bytes"] <= 227 * 1024
    assert b"misaligned" in lib.fusedops_gemm_error_string(1).lower()


# ---------------------------------------------------------------- GPU

def _cuda_inputs(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = random_with_outliers((m, k), torch.bfloat16, "cuda", g)
    return x, weights(n, k, torch.bfloat16, "cuda", seed + 1)


ODD_SHAPES = [(1, 512, 64), (7, 1024, 200), (130, 512, 4096), (333, 1536, 328)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", LINEAR, ids=lambda v: v.name)
@pytest.mark.parametrize("m, n, k", ODD_SHAPES + [(257, 264, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_linear_variant_matches_fp32(variant, m, n, k, with_residual):
    x, w = _cuda_inputs(m, n, k, seed=m + n)
    res = random_with_outliers((m, n), torch.bfloat16, "cuda", torch.Generator().manual_seed(9))
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
    gemm.cutlass_linear(x, w, res if with_residual else None, gemm.Route(1 << 40, variant.name), out=out)
    ref = x.float() @ w.float().T + (res.float() if with_residual else 0)
    assert rel_err(out, ref) <= BF16_MAX_ERR


@pytest.mark.gpu
@pytest.mark.parametrize("variant", SWIGLU, ids=lambda v: v.name)
@pytest.mark.parametrize("m, n, k", ODD_SHAPES)
def test_swiglu_variant_matches_fp32(variant, m, n, k):
    x, w_gate = _cuda_inputs(m, n, k, seed=m)
    w_up = weights(n, k, torch.bfloat16, "cuda", seed=m + 7)
    w = gemm.prepare_gate_up(w_gate, w_up, gemm.GATE_UP_BLOCK)
    out = poison_(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
    gemm.cutlass_gate_up_silu(x, w, gemm.GATE_UP_BLOCK, gemm.Route(1 << 40, variant.name), out=out)
    assert rel_err(out, exact_swiglu(x.float(), w_gate.float(), w_up.float())) <= BF16_MAX_ERR


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100, 2048])
def test_ops_follow_their_routes_and_match_fp32(m):
    k, n, inter = 512, 768, 1024
    g = torch.Generator().manual_seed(m)
    x = random_with_outliers((1, m, k), torch.bfloat16, "cuda", g)
    w = weights(n, k, torch.bfloat16, "cuda", 1)
    res = random_with_outliers((1, m, n), torch.bfloat16, "cuda", g)
    w_gate, w_up = weights(inter, k, torch.bfloat16, "cuda", 2), weights(inter, k, torch.bfloat16, "cuda", 3)
    w_gu = gemm.prepare_gate_up(w_gate, w_up, gemm.GATE_UP_BLOCK)
    ref = x.float() @ w.float().T
    assert rel_err(ops.linear(x, w, None), ref) <= BF16_MAX_ERR
    assert rel_err(ops.linear_residual(x, w, res), ref + res.float()) <= BF16_MAX_ERR
    out = ops.gate_up_silu(x, w_gu, gemm.GATE_UP_BLOCK)
    assert out.shape == (1, m, inter)
    assert rel_err(out, exact_swiglu(x.float(), w_gate.float(), w_up.float())) <= BF16_MAX_ERR


@pytest.mark.gpu
def test_ops_fall_back_to_cublas_for_what_cutlass_cannot_take():
    x = torch.randn(64 * 130 + 1, device="cuda").bfloat16()[1:].view(130, 64)  # misaligned rows
    w = weights(96, 64, torch.bfloat16, "cuda")
    assert rel_err(ops.linear(x, w, None), x.float() @ w.float().T) <= BF16_MAX_ERR
    xh, wh = x.half(), w.half()
    assert rel_err(ops.linear_residual(xh, wh, xh[:, :1].expand(130, 96).contiguous()),
                   xh.float() @ wh.float().T + xh[:, :1].float()) <= BF16_MAX_ERR
    w_gu = torch.randn(2 * 96, 64, device="cuda").bfloat16()
    out = ops.gate_up_silu(x.contiguous(), w_gu, 48)  # block that no SwiGLU variant serves
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variants_capture_in_cuda_graphs(variant):
    m, n, k = 96, 512, 256
    x, w = _cuda_inputs(m, n, k, seed=3)
    route = gemm.Route(1 << 40, variant.name)
    if variant.epilogue == "swiglu":
        run = lambda: gemm.cutlass_gate_up_silu(x, w, gemm.GATE_UP_BLOCK, route)  # noqa: E731
        g_, u_ = gemm.split_gate_up(w, gemm.GATE_UP_BLOCK)
        ref = F.silu(x.float() @ g_.float().T) * (x.float() @ u_.float().T)
    else:
        run = lambda: gemm.cutlass_linear(x, w, None, route)  # noqa: E731
        ref = x.float() @ w.float().T
    graph, out = capture_graph(run)
    poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref) <= BF16_MAX_ERR


@pytest.mark.parametrize("block", [16, 256])   # interleaved blocks, and the plain [Wg; Wu] layout (block = I)
def test_cublas_fallback_rounds_the_gemm_then_silu_mul_once(block):
    x = random_with_outliers((3, 64), torch.bfloat16, "cpu", torch.Generator().manual_seed(7))
    w_gate, w_up = weights(256, 64, torch.bfloat16, seed=8), weights(256, 64, torch.bfloat16, seed=9)
    out = gemm.gate_up_silu_torch(x, gemm.prepare_gate_up(w_gate, w_up, block), block)
    g, u = F.linear(x, w_gate), F.linear(x, w_up)                  # GEMM outputs in bf16, as cuBLAS gives them
    assert torch.equal(out, (F.silu(g.float()) * u.float()).bfloat16())
