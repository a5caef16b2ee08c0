"""Compile CUDA sources from csrc/ into cubins (or shared libraries), with an on-disk cache.

The cache key covers everything that can change the binary: the source, every project header it
includes (followed transitively), the flags, the target arch, the compiler's version and, for
CUTLASS users, the installed nvidia-cutlass version. Writes are atomic (temp file + os.replace), so
two processes building the same kernel never leave a torn file.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC_DIR = Path(os.environ.get("FUSEDOPS_CSRC", REPO_ROOT / "csrc"))
TEMPLATES_DIR = REPO_ROOT / "templates"

# -DNDEBUG: device asserts would serialize wgmma across calls (ptxas C7510).
BASE_FLAGS = ("-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo")

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class CompileError(RuntimeError):
    """nvcc/NVRTC rejected a source; the message carries the compiler's output."""


@dataclass(frozen=True)
class KernelSource:
    """One compilation unit: a .cu file and how to build it."""

    name: str                      # unique, used in cache file names and by the CLI
    path: Path                     # the .cu file
    flags: tuple[str, ...] = ()    # extra nvcc flags (e.g. -D defines)
    uses_cutlass: bool = False     # add nvidia-cutlass include paths and version to the key
    shared_library: bool = False   # build a host .so (C ABI launcher) instead of a cubin
    archs: tuple[str, ...] = field(default=("sm_90a", "sm_89", "sm_80"))  # archs it supports
    # every kernel calls pdl::enter() (csrc/common/pdl.cuh) before touching tensors, so the launcher may
    # start it early (programmatic dependent launch); tests/test_runtime.py checks the PTX of each entry
    pdl: bool = True


def cache_dir() -> Path:
    root = os.environ.get("FUSEDOPS_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedops"


def arch_flag(arch: str) -> str:
    """'sm_90a' -> the -gencode form (the -arch shorthand also runs a plain sm_90 pass)."""
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch: expected a name like 'sm_90a' or 'sm_80', got {arch!r}")
    num = arch[3:]
    return f"-gencode=arch=compute_{num},code={arch}"


def arch_for_capability(major: int, minor: int) -> str:
    """The cubin arch to load on a device of this compute capability."""
    if (major, minor) == (9, 0):
        return "sm_90a"  # wgmma/setmaxnreg need the arch-specific target
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def compiler_id() -> str:
    """A string that changes whenever the compiler that would be used changes."""
    nvcc = nvcc_path()
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        return "nvcc:" + out.strip().splitlines()[-1]
    from cuda.bindings import nvrtc
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"neither nvcc nor NVRTC is usable (nvrtcVersion: {err})")
    return f"nvrtc:{major}.{minor}"


@functools.lru_cache(maxsize=None)
def cutlass_include_dirs() -> tuple[Path, ...]:
    """CUTLASS/CuTe headers from the installed nvidia-cutlass package (never a vendored copy)."""
    try:
        import cutlass_library
    except ImportError as exc:
        raise CompileError("this kernel needs the nvidia-cutlass package (pip install nvidia-cutlass)") from exc
    src = Path(cutlass_library.__file__).parent / "source"
    dirs = (src / "include", src / "tools" / "util" / "include")
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise CompileError(f"nvidia-cutlass is installed but lacks headers at {missing}")
    return dirs


def cutlass_version() -> str:
    from importlib.metadata import version
    return version("nvidia-cutlass")


def local_includes(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """Project headers that `path` includes with "...", transitively, in a stable order."""
    seen = set() if seen is None else seen
    found = []
    for rel in _INCLUDE_RE.findall(path.read_text()):
        for base in (path.parent, CSRC_DIR, TEMPLATES_DIR):
            cand = (base / rel).resolve()
            if cand.is_file():
                if cand not in seen:
                    seen.add(cand)
                    found.append(cand)
                    found.extend(local_includes(cand, seen))
                break
    return found


def _stable_name(path: Path) -> str:
    """A header's name that is the same wherever the checkout lives (so a cache built on one machine
    hits on another): relative to the project's source roots, else the file name alone."""
    for root in (CSRC_DIR, TEMPLATES_DIR, REPO_ROOT):
        try:
            return str(path.resolve().relative_to(Path(root).resolve()))
        except ValueError:
            continue
    return path.name


def cache_key(src: KernelSource, arch: str) -> str:
    h = hashlib.sha256()
    for part in (src.name, arch, compiler_id(), " ".join(BASE_FLAGS + src.flags), str(src.shared_library)):
        h.update(part.encode() + b"\0")
    h.update(src.path.read_bytes())
    for header in local_includes(src.path):
        h.update(_stable_name(header).encode() + b"\0")
        h.update(header.read_bytes())
    if src.uses_cutlass:
        h.update(cutlass_version().encode())
    return h.hexdigest()[:20]


def artifact_path(src: KernelSource, arch: str) -> Path:
    ext = "so" if src.shared_library else "cubin"
    return cache_dir() / f"{src.name}-{arch}-{cache_key(src, arch)}.{ext}"


def build(src: KernelSource, arch: str) -> Path:
    """Return the cached artifact for (src, arch), compiling it first if the cache lacks it."""
    if arch not in src.archs:
        raise ValueError(f"arch: kernel {src.name!r} supports {src.archs}, not {arch!r}")
    out = artifact_path(src, arch)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if nvcc_path():
            log = _nvcc(src, arch, tmp)
        elif src.shared_library:
            raise CompileError(f"{src.name}: building a host launcher needs nvcc, which is not installed")
        else:
            log = _nvrtc(src, arch, tmp)
        Path(str(out) + ".log").write_text(log)  # ptxas -v report: registers, smem, spills
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _include_flags(src: KernelSource) -> list[str]:
    dirs = [CSRC_DIR, TEMPLATES_DIR]
    if src.uses_cutlass:
        dirs += list(cutlass_include_dirs())
    return [f"-I{d}" for d in dirs]


def nvcc_command(src: KernelSource, arch: str, out: str, mode: str) -> list[str]:
    """mode: '-cubin', '-ptx' or '-shared' (host launcher library)."""
    cmd = [nvcc_path(), mode, arch_flag(arch), *BASE_FLAGS, *src.flags, *_include_flags(src)]
    if mode == "-shared":
        cmd += ["-Xcompiler", "-fPIC"]
    if mode != "-ptx":
        cmd += ["-Xptxas", "-v"]
    return cmd + ["-o", out, str(src.path)]


def _nvcc(src: KernelSource, arch: str, out: str) -> str:
    mode = "-shared" if src.shared_library else "-cubin"
    proc = subprocess.run(nvcc_command(src, arch, out, mode), capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"nvcc failed on {src.path.name} for {arch}:\n{proc.stderr}")
    return proc.stderr


def emit_ptx(src: KernelSource, arch: str) -> str:
    """PTX text of a source (for checks of the instructions a kernel promises)."""
    if not nvcc_path():
        raise CompileError("emit_ptx needs nvcc")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "k.ptx")
        proc = subprocess.run(nvcc_command(src, arch, out, "-ptx"), capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"nvcc -ptx failed on {src.path.name}:\n{proc.stderr}")
        return Path(out).read_text()


def disassemble(cubin: Path) -> str:
    """SASS of a cubin through cuobjdump (ships with nvcc)."""
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(nvcc_path() or ""), "cuobjdump")
    proc = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"cuobjdump failed on {cubin}:\n{proc.stderr}")
    return proc.stdout


def _nvrtc(src: KernelSource, arch: str, out: str) -> str:
    from cuda.bindings import nvrtc

    def check(result, what):
        err = result[0] if isinstance(result, tuple) else result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC {what} failed on {src.path.name}: {err}")
        return result[1:] if isinstance(result, tuple) and len(result) > 1 else None

    text = src.path.read_bytes()
    (prog,) = check(nvrtc.nvrtcCreateProgram(text, src.path.name.encode(), 0, [], []), "create")
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "-DNDEBUG"]
    opts += [f"-I{d}" for d in (CSRC_DIR, TEMPLATES_DIR)]
    opts += [f for f in src.flags if f.startswith("-D")]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if os.path.isdir(os.path.join(cuda_home, "include")):
        opts.append(f"-I{os.path.join(cuda_home, 'include')}")
    result = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
    log = b" " * size
    check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
    if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"NVRTC failed on {src.path.name} for {arch}:\n{log.decode(errors='replace')}")
    (size,) = check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
    cubin = b" " * size
    check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
    Path(out).write_bytes(cubin)
    return log.decode(errors="replace")
