"""The kernel runtime: arch flags, cache keys, atomic cached builds, NVRTC fallback, CLI, launch errors."""
import multiprocessing
import re
import subprocess
import sys

import pytest
import torch

import fusedops  # noqa: F401  (registers every kernel source)
from fusedops.runtime import compiler, registry
from fusedops.runtime.compiler import CompileError, KernelSource

TINY_KERNEL = r'''
#include "tiny.cuh"
struct AxpyParams { float* y; const float* x; float a; int n; };
extern "C" __global__ void axpy(const __grid_constant__ AxpyParams p) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) p.y[i] += scale(p.a) * p.x[i];
}
'''


@pytest.fixture
def tiny_tree(tmp_path, monkeypatch):
    """A private csrc/ with one kernel including one header, and a private cache."""
    src_dir = tmp_path / "csrc"
    src_dir.mkdir()
    (src_dir / "tiny.cuh").write_text("__device__ inline float scale(float a) { return a; }\n")
    (src_dir / "tiny.cu").write_text(TINY_KERNEL)
    monkeypatch.setattr(compiler, "CSRC_DIR", src_dir)
    monkeypatch.setenv("FUSEDOPS_CACHE", str(tmp_path / "cache"))
    return KernelSource("tiny", src_dir / "tiny.cu", archs=("sm_90a", "sm_80"))


def test_arch_flags():
    assert compiler.arch_flag("sm_90a") == "-gencode=arch=compute_90a,code=sm_90a"
    assert compiler.arch_flag("sm_80") == "-gencode=arch=compute_80,code=sm_80"
    assert compiler.arch_for_capability(9, 0) == "sm_90a"
    assert compiler.arch_for_capability(8, 9) == "sm_89"
    with pytest.raises(ValueError, match="arch"):
        compiler.arch_flag("hopper")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDOPS_CACHE", str(tmp_path / "x"))
    assert compiler.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FUSEDOPS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiler.cache_dir() == tmp_path / "xdg" / "fusedops"


def test_cache_key_tracks_source_headers_flags_and_arch(tiny_tree):
    base = compiler.cache_key(tiny_tree, "sm_90a")
    assert compiler.cache_key(tiny_tree, "sm_90a") == base
    assert compiler.cache_key(tiny_tree, "sm_80") != base
    flagged = KernelSource("tiny", tiny_tree.path, flags=("-DFOO=1",), archs=tiny_tree.archs)
    assert compiler.cache_key(flagged, "sm_90a") != base
    header = tiny_tree.path.parent / "tiny.cuh"
    header.write_text(header.read_text() + "// a changed header must change the key\n")
    assert compiler.cache_key(tiny_tree, "sm_90a") != base


def test_local_includes_are_transitive(tiny_tree):
    header = tiny_tree.path.parent / "tiny.cuh"
    (tiny_tree.path.parent / "inner.cuh").write_text("#pragma once\n")
    header.write_text('#include "inner.cuh"\n' + header.read_text())
    names = [p.name for p in compiler.local_includes(tiny_tree.path)]
    assert names == ["tiny.cuh", "inner.cuh"]


@pytest.mark.nvcc
def test_build_is_cached(tiny_tree, monkeypatch):
    path = compiler.build(tiny_tree, "sm_90a")
    assert path.read_bytes()[:4] == b"\x7fELF"
    assert "Used" in path.with_name(path.name + ".log").read_text()  # ptxas -v resource report kept

    def no_compile(*args, **kwargs):
        raise AssertionError("a warm cache must not compile")
    monkeypatch.setattr(compiler, "_nvcc", no_compile)
    assert compiler.build(tiny_tree, "sm_90a") == path


def _build_in_child(args):
    cache, csrc = args
    import os
    os.environ["FUSEDOPS_CACHE"] = cache
    from fusedops.runtime import compiler as c
    c.CSRC_DIR = c.Path(csrc)
    src = c.KernelSource("tiny", c.Path(csrc) / "tiny.cu", archs=("sm_90a",))
    return str(c.build(src, "sm_90a"))


@pytest.mark.nvcc
def test_concurrent_builds_leave_one_whole_file(tiny_tree, tmp_path):
    args = (str(tmp_path / "cache"), str(tiny_tree.path.parent))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_build_in_child, [args, args])
    assert paths[0] == paths[1]
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert not [f for f in files if f.endswith(".tmp")], files
    assert compiler.Path(paths[0]).read_bytes()[:4] == b"\x7fELF"


@pytest.mark.nvcc
def test_compile_error_carries_compiler_output(tiny_tree):
    tiny_tree.path.write_text("this is not CUDA;\n")
    with pytest.raises(CompileError, match="tiny.cu"):
        compiler.build(tiny_tree, "sm_90a")
    assert not list((compiler.cache_dir()).glob("*.tmp"))


def test_unsupported_arch_is_rejected(tiny_tree):
    with pytest.raises(ValueError, match="arch"):
        compiler.build(tiny_tree, "sm_75")


def _nvrtc_usable() -> bool:
    try:
        from cuda.bindings import nvrtc
        return nvrtc.nvrtcVersion()[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    except Exception:  # noqa: BLE001 - the library may be absent entirely
        return False


@pytest.mark.skipif(not _nvrtc_usable(), reason="libnvrtc not loadable here")
def test_nvrtc_fallback_builds_a_cubin(tiny_tree, monkeypatch):
    monkeypatch.setattr(compiler, "nvcc_path", lambda: None)
    monkeypatch.setattr(compiler, "compiler_id", lambda: "nvrtc:test")
    path = compiler.build(tiny_tree, "sm_90a")
    assert path.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.nvcc
@pytest.mark.parametrize("name", sorted(n for n, s in registry.SOURCES.items() if not s.shared_library))
def test_every_kernel_source_builds_for_sm90a_without_spills(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDOPS_CACHE", str(tmp_path))
    path = compiler.build(registry.SOURCES[name], "sm_90a")
    log = path.with_name(path.name + ".log").read_text()
    spills = [line for line in log.splitlines() if "spill" in line and not line.strip().endswith(
        "0 bytes spill stores, 0 bytes spill loads")]
    assert not spills, f"{name} spills registers:\n" + "\n".join(spills)


_MEMORY_OP = re.compile(r"^(@!?%\w+\s+)?(ld|st|atom|red|cp|multimem|sust|suld|tex|tld4)\.([\w.:]+)")
_SAFE_SPACES = {"param", "shared", "local", "const"}


def _may_touch_global(line: str) -> bool:
    """A PTX memory instruction whose state space is not param/shared/local/const (generic counts: it may
    address global memory). Prefetches (prefetch.global.L2, cp.async.bulk.prefetch.L2) are not: they return
    nothing and change no memory."""
    m = _MEMORY_OP.match(line)
    if not m:
        return False
    spaces = set(m.group(3).replace("::", ".").split("."))
    if "prefetch" in spaces:
        return False
    return "global" in spaces or not (_SAFE_SPACES & spaces)


def test_global_memory_detector_catches_every_form():
    for line in ("ld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];", "st.volatile.global.u8 [%rd2], %rs1;",
                 "ld.u32 %r1, [%rd1];", "atom.global.add.u32 %r1, [%rd1], 1;", "red.relaxed.gpu.global.add.u32 [%rd1], 1;",
                 "cp.async.cg.shared.global [%r1], [%rd1], 16;", "@%p1 st.global.u32 [%rd1], %r1;",
                 "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1], %r2, [%r3];"):
        assert _may_touch_global(line), line
    for line in ("ld.param.u64 %rd1, [p];", "st.shared.u32 [%r1], %r2;", "ld.local.u32 %r1, [%rd1];",
                 "prefetch.global.L2 [%rd1];", "cp.async.bulk.prefetch.L2.global [%rd3], %r5;",
                 "mov.u32 %r1, %tid.x;", "cvta.to.global.u64 %rd2, %rd1;"):
        assert not _may_touch_global(line), line


@pytest.mark.nvcc
@pytest.mark.parametrize("name", sorted(n for n, s in registry.SOURCES.items() if s.pdl))
def test_every_pdl_kernel_waits_for_its_predecessor(name):
    """A source marked pdl is launched so that it may start before the previous kernel ends: each entry
    must wait (griddepcontrol.wait) before it reads an input, and release the next kernel only after."""
    ptx = compiler.emit_ptx(registry.SOURCES[name], "sm_90a")
    entries = re.split(r"\.entry\s+", ptx)[1:]
    assert entries, f"{name}: no kernel entries in the PTX"
    for body in entries:
        entry = body.split("(", 1)[0]
        wait, release = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
        assert wait >= 0, f"{name}: {entry} never waits for its predecessor"
        assert release > wait, f"{name}: {entry} releases the next kernel before it waits"
        before = [line.strip() for line in body[:wait].splitlines()]
        touching = [line for line in before if _may_touch_global(line)]
        assert not touching, f"{name}: {entry} touches memory before it waits: {touching[:3]}"


def test_shared_library_sources_are_not_launched_early():
    assert all(not s.pdl for s in registry.SOURCES.values() if s.shared_library)


def test_cli_info_without_gpu_says_so(tmp_path):
    env = {"FUSEDOPS_CACHE": str(tmp_path), "PATH": __import__("os").environ["PATH"]}
    out = subprocess.run([sys.executable, "-m", "fusedops", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "cache" in out.stdout
    if not torch.cuda.is_available():
        assert "Kernels need a GPU" in out.stdout


@pytest.mark.nvcc
def test_cli_build_fills_the_cache(tmp_path):
    env = {"FUSEDOPS_CACHE": str(tmp_path), "PATH": __import__("os").environ["PATH"]}
    cmd = [sys.executable, "-m", "fusedops", "build", "--arch", "sm_90a", "--only", "rmsnorm"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.glob("rmsnorm-sm_90a-*.cubin"))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert "cached" in again.stdout


@pytest.mark.gpu
def test_launch_error_names_kernel_and_shape():
    from fusedops.ops.rmsnorm import SOURCE, RmsNormParams
    k = registry.get_kernel(SOURCE, "rmsnorm_bf16_c1", RmsNormParams, torch.device("cuda"))
    with pytest.raises(fusedops.runtime.CudaError, match=r"rmsnorm_bf16_c1.*block=\(4096"):
        k.launch((1,), (4096,), RmsNormParams())


@pytest.mark.gpu
def test_kernel_launches_are_captured_by_cuda_graphs():
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.fusedops.rms_norm(x, w, 1e-6)  # warm-up: build + load outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fusedops.rms_norm(x, w, 1e-6)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = fusedops.ops.rmsnorm.rms_norm_reference(x, w, 1e-6)
    assert torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
