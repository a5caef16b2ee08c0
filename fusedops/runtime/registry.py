"""The table of kernel sources, and the one place that turns (source, function, device) into a
loaded Kernel. Ops declare their sources here at import, so `python -m fusedops build` sees all."""
from __future__ import annotations

import functools

import torch

from . import compiler
from .compiler import CSRC_DIR, KernelSource
from .driver import Kernel

SOURCES: dict[str, KernelSource] = {}


def register_source(name: str, filename: str, **kwargs) -> KernelSource:
    """Declare csrc/<filename> (or an absolute path) as a compilation unit called `name`."""
    path = compiler.Path(filename)
    src = KernelSource(name=name, path=path if path.is_absolute() else CSRC_DIR / path, **kwargs)
    if name in SOURCES and SOURCES[name] != src:
        raise ValueError(f"name: kernel source {name!r} is registered twice with different settings")
    SOURCES[name] = src
    return src


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return compiler.arch_for_capability(major, minor)


@functools.lru_cache(maxsize=None)
def _load(source_name: str, function: str, params_type: type, device_index: int) -> Kernel:
    src = SOURCES[source_name]
    arch = device_arch(torch.device("cuda", device_index))
    cubin = compiler.build(src, arch)
    major, _ = torch.cuda.get_device_capability(device_index)
    return Kernel.load(cubin, function, params_type, device_index, pdl=src.pdl and major >= 9)


def get_kernel(source: KernelSource, function: str, params_type: type, device: torch.device) -> Kernel:
    """The loaded kernel for `device`, built (or taken from the cache) on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _load(source.name, function, params_type, index)


def build_all(archs, names=None, jobs: int = 1, progress=print) -> list[tuple[str, str, float, str]]:
    """Compile every registered source (or `names`) for each arch. Returns (name, arch, seconds, path)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    todo = [(SOURCES[n], a) for n in (names or sorted(SOURCES)) for a in archs if a in SOURCES[n].archs]

    def one(item):
        src, arch = item
        cached = compiler.artifact_path(src, arch).exists()
        t0 = time.perf_counter()
        path = compiler.build(src, arch)
        dt = 0.0 if cached else time.perf_counter() - t0
        progress(f"  {src.name:<28} {arch:<7} {'cached' if cached else f'{dt:6.1f} s'}")
        return src.name, arch, dt, str(path)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, todo))
