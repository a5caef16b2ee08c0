"""GEMM ops for the Llama projections (y = x @ W^T, W in nn.Linear's [N, K] layout):

    fusedops::linear(x, weight, bias)          plain GEMM (fused [Wq; Wk; Wv], lm_head)
    fusedops::linear_residual(x, weight, res)  x @ W^T + res (o_proj, down_proj)
    fusedops::gate_up_silu(x, w_gate_up, block) silu(x Wg^T) * (x Wu^T) from one prepared weight

`prepare_gate_up(w_gate, w_up, block)` interleaves gate and up rows in blocks of `block` rows
([g0..g_{b-1}, u0..u_{b-1}, g_b..., ...]) so that one GEMM tile holds matching gate and up columns;
block == I (the intermediate size) is plain concatenation [Wg; Wu]. The CUTLASS SwiGLU kernels need
block == GATE_UP_BLOCK (half their tile N); any other block runs on cuBLAS.

Decode token counts (M <= GEMV_MAX_M) run the weight-streaming GEMV of fusedops/ops/gemv.py wherever
it can take the call (bf16/fp16, K a multiple of 8, 16-byte aligned rows). Above that, the CUDA path
dispatches by token count M and reduction size K (ROUTES): a CUTLASS instantiation from
fusedops/gemm_codegen.py where it measured faster on the H100, cuBLAS (torch) otherwise, and cuBLAS
for whatever CUTLASS cannot take (bias, non-bf16, misaligned rows). The direct entry points
cutlass_linear / cutlass_gate_up_silu raise ValueError instead. Numbers: perf/notes/gemm.md.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..gemm_codegen import VARIANTS, Variant
from ..runtime import compiler, register_source
from . import gemv
from ._launch import check_cuda, check_dtype, check_same_dtype, rows16_problem, rows_view

CUTLASS_ARCH = "sm_90a"
SOURCES = {v.name: register_source(v.name, str(v.path), uses_cutlass=True, shared_library=True, pdl=False,
                                   archs=(CUTLASS_ARCH,)) for v in VARIANTS}
_SWIGLU_TILE_N = {v.tile[1] for v in VARIANTS if v.epilogue == "swiglu"}
assert len(_SWIGLU_TILE_N) <= 1, "every SwiGLU variant must share one tile N (one prepared weight)"
GATE_UP_BLOCK = _SWIGLU_TILE_N.pop() // 2 if _SWIGLU_TILE_N else 0


@dataclass(frozen=True)
class Route:
    """Which kernel serves token counts up to max_m (and reduction sizes up to max_k), with its
    runtime tile-scheduler settings."""
    max_m: int
    variant: Optional[str]          # a VARIANTS name, or None for cuBLAS
    swizzle: int = 1
    raster: int = 0                 # 0 heuristic, 1 along M, 2 along N
    decomposition: int = 0          # stream-K variants: 0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K
    splits: int = 1
    max_k: int = 1 << 62


_ALL = 1 << 62
_SWIGLU_SMALL = "gemm_swiglu_bf16_64x256x64_c2x1_pingpong_persistent"
_SWIGLU_LARGE = "gemm_swiglu_bf16_128x256x64_c2x1_coop_persistent"
_LINEAR_LARGE = "gemm_linear_bf16_128x256x64_c2x1_coop_persistent"
# Per op, in order; the first route with m <= max_m and k <= max_k serves the call. From the H100
# sweeps in perf/notes/gemm.md:
# - gate_up_silu: ping-pong 1.00-1.15x the two-GEMM baseline at M <= 128 (~1.0 at 512); 128x256
#   cooperative 1.02-1.07x at 2048; at 8192 it needs raster along M + swizzle 8 (1.04x, default 0.97x).
# - linear: cuBLAS is faster for the plain GEMM on the qkv shape (CUTLASS 0.89-0.99x), so it keeps it.
# - linear_residual: CUTLASS + fused add 1.09-1.11x at K=4096 (o_proj); at K=14336 (down_proj)
#   0.90-1.03x, so long K and decode sizes (0.3-0.9x) stay on cuBLAS.
ROUTES: dict[str, tuple[Route, ...]] = {
    "linear": (Route(_ALL, None),),
    "linear_residual": (Route(1024, None), Route(_ALL, _LINEAR_LARGE, max_k=8192), Route(_ALL, None)),
    "gate_up_silu": (Route(512, _SWIGLU_SMALL), Route(4096, _SWIGLU_LARGE),
                     Route(_ALL, _SWIGLU_LARGE, swizzle=8, raster=1)),
}


# Token counts up to which each op runs the GEMV (before ROUTES is consulted). H100 run 2, perf/notes/gemv.md:
# at M = 1..16 it beat cuBLAS + torch epilogue on every Llama-3-8B projection (qkv 1.05-1.11x, o_proj +
# residual 1.33-1.36x, down + residual 1.10-1.13x, gate/up + SwiGLU 1.11-1.12x) and the CUTLASS SwiGLU
# kernel that served M <= 512 (1.08-1.12x).
GEMV_MAX_M = {"linear": gemv.MAX_M, "linear_residual": gemv.MAX_M, "gate_up_silu": gemv.MAX_M}


def route_for(op: str, m: int, k: int) -> Route:
    return next(r for r in ROUTES[op] if m <= r.max_m and k <= r.max_k)


def prepare_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor, block: int) -> torch.Tensor:
    if w_gate.shape != w_up.shape or w_gate.dim() != 2:
        raise ValueError(f"w_up: shape {tuple(w_up.shape)} must equal w_gate's {tuple(w_gate.shape)} (2-D)")
    inter, k = w_gate.shape
    if block <= 0 or inter % block:
        raise ValueError(f"block: {block} must divide the intermediate size {inter}")
    g = w_gate.reshape(inter // block, block, k)
    u = w_up.reshape(inter // block, block, k)
    return torch.stack((g, u), dim=1).reshape(2 * inter, k).contiguous()


def split_gate_up(w_gate_up: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of prepare_gate_up (views where possible)."""
    two_i, k = w_gate_up.shape
    blocks = w_gate_up.reshape(two_i // (2 * block), 2, block, k)
    return blocks[:, 0].reshape(-1, k), blocks[:, 1].reshape(-1, k)


class GemmArgs(ctypes.Structure):
    """Mirror of FusedGemmArgs (templates/gemm_args.h); its size is checked against each library."""
    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("c", ctypes.c_void_p), ("d", ctypes.c_void_p),
                ("workspace", ctypes.c_void_p),
                ("m", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("lda", ctypes.c_int64), ("ldb", ctypes.c_int64), ("ldc", ctypes.c_int64), ("ldd", ctypes.c_int64),
                ("alpha", ctypes.c_float), ("beta", ctypes.c_float),
                ("device", ctypes.c_int32), ("sm_count", ctypes.c_int32), ("swizzle", ctypes.c_int32),
                ("raster", ctypes.c_int32), ("splits", ctypes.c_int32), ("decomposition", ctypes.c_int32)]


_VARIANTS = {v.name: v for v in VARIANTS}


@functools.lru_cache(maxsize=None)
def library(name: str) -> ctypes.CDLL:
    """The built (or cached) launcher library of a VARIANTS entry, checked against the table."""
    if name not in _VARIANTS:
        raise ValueError(f"variant: {name!r} is not in fusedops.gemm_codegen.VARIANTS")
    lib = ctypes.CDLL(str(compiler.build(SOURCES[name], CUTLASS_ARCH)))
    lib.fusedops_gemm_run.argtypes = [ctypes.POINTER(GemmArgs), ctypes.c_void_p]
    lib.fusedops_gemm_run.restype = ctypes.c_int
    lib.fusedops_gemm_workspace_size.argtypes = [ctypes.POINTER(GemmArgs)]
    lib.fusedops_gemm_workspace_size.restype = ctypes.c_size_t
    lib.fusedops_gemm_args_size.restype = ctypes.c_size_t
    lib.fusedops_gemm_error_string.argtypes = [ctypes.c_int]
    lib.fusedops_gemm_error_string.restype = ctypes.c_char_p
    if lib.fusedops_gemm_args_size() != ctypes.sizeof(GemmArgs):
        raise RuntimeError(f"{name}: FusedGemmArgs is {lib.fusedops_gemm_args_size()} bytes in the library, "
                           f"{ctypes.sizeof(GemmArgs)} in GemmArgs")
    cfg = variant_config(lib)
    v = _VARIANTS[name]
    if (cfg["tile"], cfg["cluster"], cfg["swiglu"]) != (v.tile, v.cluster, v.epilogue == "swiglu"):
        raise RuntimeError(f"{name}: library was built for {cfg}, the table says {v}")
    return lib


def variant_config(lib: ctypes.CDLL) -> dict:
    out = (ctypes.c_int * 8)()
    lib.fusedops_gemm_config(out)
    return {"tile": tuple(out[0:3]), "cluster": tuple(out[3:5]), "stages": out[5], "swiglu": bool(out[6]),
            "smem_bytes": out[7]}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def cutlass_available(device_index: int) -> bool:
    """An H100-class device and every shipped library either cached or buildable here."""
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    if all(compiler.artifact_path(src, CUTLASS_ARCH).exists() for src in SOURCES.values()):
        return True
    try:
        compiler.cutlass_include_dirs()
    except compiler.CompileError:
        return False
    return compiler.nvcc_path() is not None


def _operand_problem(name: str, t: torch.Tensor) -> Optional[str]:
    """Why t cannot be a CUTLASS operand (TMA reads 16-byte aligned rows of bf16), or None."""
    if t.dtype != torch.bfloat16:
        return f"{name}: dtype {t.dtype} is not supported by the CUTLASS GEMMs (bf16 only)"
    return rows16_problem(name, t)


def _check_operand(name: str, t: torch.Tensor) -> None:
    problem = _operand_problem(name, t)
    if problem:
        raise ValueError(problem)


def _launch(name: str, route: Route, a, b, c, d, beta: float, n: int) -> None:
    lib = library(name)
    m, k = a.shape
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    args = GemmArgs(a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr(), None, m, n, k,
                    a.stride(0), b.stride(0), c.stride(0), d.stride(0), 1.0, beta,
                    dev, _sm_count(dev), route.swizzle, route.raster, route.splits, route.decomposition)
    size = lib.fusedops_gemm_workspace_size(ctypes.byref(args))
    workspace = torch.empty(size, dtype=torch.uint8, device=a.device) if size else None
    if workspace is not None:
        args.workspace = workspace.data_ptr()
    code = lib.fusedops_gemm_run(ctypes.byref(args), torch.cuda.current_stream(a.device).cuda_stream)
    if code:
        raise RuntimeError(f"{name} (m={m}, n={n}, k={k}) failed: {lib.fusedops_gemm_error_string(code).decode()}")


def _checked_problem(x: torch.Tensor, weight: torch.Tensor, route: Route, epilogue: str, weight_name: str) -> Variant:
    if route.variant not in _VARIANTS or _VARIANTS[route.variant].epilogue != epilogue:
        raise ValueError(f"route: variant {route.variant!r} is not a {epilogue} entry of VARIANTS")
    _check_operand("x", x)
    _check_operand(weight_name, weight)
    if x.shape[1] != weight.shape[1] or x.shape[0] == 0:
        raise ValueError(f"{weight_name}: shape {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    if x.shape[1] % 8:
        raise ValueError(f"x: K = {x.shape[1]} must be a multiple of 8 (16-byte rows)")
    if max(x.shape[0], weight.shape[0], x.shape[1]) >= 1 << 31:
        raise ValueError(f"x: problem {tuple(x.shape)} x {tuple(weight.shape)} exceeds 32-bit sizes")
    return _VARIANTS[route.variant]


def _check_devices(**tensors: torch.Tensor) -> None:
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        check_cuda(name, t, first.device)


def _output(name: str, out: Optional[torch.Tensor], like: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if out is None:
        return like.new_empty(shape)
    if out.shape != shape:
        raise ValueError(f"{name}: shape {tuple(out.shape)} != {shape}")
    _check_operand(name, out)
    return out


def cutlass_linear(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], route: Route,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ residual [M, N]) on a CUTLASS linear variant, bf16 only."""
    _checked_problem(x, weight, route, "linear", "weight")
    m, n = x.shape[0], weight.shape[0]
    if n % 8:
        raise ValueError(f"weight: N = {n} must be a multiple of 8 (16-byte output rows)")
    if residual is not None:
        _check_operand("residual", residual)
        if residual.shape != (m, n):
            raise ValueError(f"residual: shape {tuple(residual.shape)} != {(m, n)}")
    out = _output("out", out, x, (m, n))
    _check_devices(x=x, weight=weight, out=out, **({} if residual is None else {"residual": residual}))
    _launch(route.variant, route, x, weight, out if residual is None else residual, out,
            0.0 if residual is None else 1.0, n)
    return out


def cutlass_gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, block: int, route: Route,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) [M, N/2] from prepare_gate_up(.., block = tile N / 2) on a SwiGLU variant."""
    v = _checked_problem(x, w_gate_up, route, "swiglu", "w_gate_up")
    two_i = w_gate_up.shape[0]
    if block != v.tile[1] // 2 or two_i % v.tile[1]:
        raise ValueError(f"block: {block} must be {v.tile[1] // 2} (half of {v.name}'s tile N) and divide "
                         f"the intermediate size {two_i // 2}")
    out = _output("out", out, x, (x.shape[0], two_i // 2))
    _check_devices(x=x, w_gate_up=w_gate_up, out=out)
    _launch(route.variant, route, x, w_gate_up, out, out, 0.0, two_i)
    return out


def _cutlass_route(op: str, *operands: torch.Tensor) -> Optional[Route]:
    """The CUTLASS route for 2-D operands (x first), or None where cuBLAS serves the call: by M, by
    dtype or alignment, or on a device without the instantiations."""
    x = operands[0]
    route = route_for(op, x.shape[0], x.shape[1])
    if route.variant is None or x.shape[0] == 0 or any(t.shape[-1] % 8 for t in operands):
        return None
    if any(_operand_problem("operand", t) for t in operands):
        return None
    return route if cutlass_available(x.device.index if x.device.index is not None else torch.cuda.current_device()) else None


def _validate_linear(x, weight, name="weight"):
    check_dtype("x", x)
    check_same_dtype(name, weight, "x", x)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} does not fit x {tuple(x.shape)} "
                         f"(expected [N, {x.shape[-1] if x.dim() else '?'}])")


def _validate_bias(bias, weight, x):
    if bias is not None:
        check_same_dtype("bias", bias, "x", x)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: shape {tuple(bias.shape)} != ({weight.shape[0]},)")


@torch.library.custom_op("fusedops::linear", mutates_args=(), device_types="cpu")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    _validate_linear(x, weight)
    _validate_bias(bias, weight, x)
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias=None):
    _validate_linear(x, weight)
    _validate_bias(bias, weight, x)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _validate_residual(x, weight, residual):
    _validate_linear(x, weight)
    check_same_dtype("residual", residual, "x", x)
    if residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"residual: shape {tuple(residual.shape)} != {(*x.shape[:-1], weight.shape[0])}")


def linear_residual_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The kernels' maths: fp32 products and sums, the residual added in fp32, one rounding."""
    return (residual.float() + F.linear(x.float(), weight.float())).to(residual.dtype)


@torch.library.custom_op("fusedops::linear_residual", mutates_args=(), device_types="cpu")
def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ W^T (o_proj, down_proj), rounded once to the model dtype as the kernels do."""
    _validate_residual(x, weight, residual)
    return linear_residual_reference(x, weight, residual)


@linear_residual.register_fake
def _(x, weight, residual):
    _validate_residual(x, weight, residual)
    return residual.new_empty(residual.shape)


def _validate_gate_up(x, w_gate_up, block):
    _validate_linear(x, w_gate_up, "w_gate_up")
    if block <= 0 or w_gate_up.shape[0] % (2 * block):
        raise ValueError(f"block: {block} does not tile w_gate_up's {w_gate_up.shape[0]} rows")


def gate_up_silu_reference(x: torch.Tensor, w_gate_up: torch.Tensor, block: int) -> torch.Tensor:
    """The kernels' maths: gate and up in fp32 (fp32 products and sums), silu(g) * u in fp32, one rounding."""
    gu = F.linear(x.float(), w_gate_up.float()).reshape(*x.shape[:-1], -1, 2, block)
    return (F.silu(gu[..., 0, :]) * gu[..., 1, :]).reshape(*x.shape[:-1], -1).to(x.dtype)


def gate_up_silu_torch(x: torch.Tensor, w_gate_up: torch.Tensor, block: int) -> torch.Tensor:
    """The cuBLAS fallback: one GEMM in the model dtype (its output rounded, as Inductor's mm is), then
    silu(g) * u with one rounding: fusedops::silu_mul_cat (one pass, fp32 inside) on the plain [Wg; Wu]
    layout, else fusedops::silu_mul on the gate / up views of the interleaved blocks."""
    gu = F.linear(x, w_gate_up)
    if block == w_gate_up.shape[0] // 2:
        return torch.ops.fusedops.silu_mul_cat(gu)
    blocks = gu.reshape(*x.shape[:-1], -1, 2, block)
    out = torch.ops.fusedops.silu_mul(blocks[..., 0, :], blocks[..., 1, :])
    return out.reshape(*x.shape[:-1], -1)


@torch.library.custom_op("fusedops::gate_up_silu", mutates_args=(), device_types="cpu")
def gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor, block: int) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) from fp32 sums, rounded once to the model dtype as the kernels do."""
    _validate_gate_up(x, w_gate_up, block)
    return gate_up_silu_reference(x, w_gate_up, block)


@gate_up_silu.register_fake
def _(x, w_gate_up, block):
    _validate_gate_up(x, w_gate_up, block)
    return x.new_empty((*x.shape[:-1], w_gate_up.shape[0] // 2))


@linear.register_kernel("cuda")
def _(x, weight, bias=None):
    _validate_linear(x, weight)
    _validate_bias(bias, weight, x)
    x2 = rows_view("x", x)
    if x2.shape[0] <= GEMV_MAX_M["linear"] and not gemv.linear_problem(x2, weight, bias):
        return gemv.gemv_linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    route = _cutlass_route("linear", x2, weight) if bias is None else None
    if route is None:
        return F.linear(x, weight, bias)
    return cutlass_linear(x2, weight, None, route).view(*x.shape[:-1], weight.shape[0])


@linear_residual.register_kernel("cuda")
def _(x, weight, residual):
    _validate_residual(x, weight, residual)
    x2, res2 = rows_view("x", x), rows_view("residual", residual)
    if x2.shape[0] <= GEMV_MAX_M["linear_residual"] and not gemv.linear_problem(x2, weight, None, res2):
        return gemv.gemv_linear(x2, weight, None, res2).view(residual.shape)
    route = _cutlass_route("linear_residual", x2, weight, res2)
    if route is None:
        return residual + F.linear(x, weight)
    return cutlass_linear(x2, weight, res2, route).view(residual.shape)


@gate_up_silu.register_kernel("cuda")
def _(x, w_gate_up, block):
    _validate_gate_up(x, w_gate_up, block)
    x2 = rows_view("x", x)
    if x2.shape[0] <= GEMV_MAX_M["gate_up_silu"] and not gemv.gate_up_problem(x2, w_gate_up, block):
        return gemv.gemv_gate_up_silu(x2, w_gate_up, block).view(*x.shape[:-1], -1)
    route = _cutlass_route("gate_up_silu", x2, w_gate_up) if block == GATE_UP_BLOCK else None
    if route is None or w_gate_up.shape[0] % (2 * block):
        return gate_up_silu_torch(x, w_gate_up, block)
    return cutlass_gate_up_silu(x2, w_gate_up, block, route).view(*x.shape[:-1], -1)
