"""Kernel runtime: compile (nvcc/NVRTC + cache), load and launch (cuda-python driver API)."""
from .compiler import CompileError, KernelSource, build, cache_dir
from .driver import CudaError, Kernel
from .registry import SOURCES, build_all, get_kernel, register_source

__all__ = ["CompileError", "CudaError", "Kernel", "KernelSource", "SOURCES", "build", "build_all",
           "cache_dir", "get_kernel", "register_source"]
