"""Load cubins and launch kernels through cuda-python's driver API, inside PyTorch's context and on
PyTorch's current stream (so launches are ordered with torch work and captured by CUDA graphs).

The driver is touched lazily: importing this module on a machine without a GPU driver is fine.
Every CUDA result is checked; a failure names the kernel, the launch shape and the CUDA error.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


@functools.lru_cache(maxsize=1)
def _driver():
    from cuda.bindings import driver  # imported lazily: CPU-only users never touch the driver
    return driver


def error_string(err) -> str:
    driver = _driver()
    ok, name = driver.cuGetErrorName(err)
    ok2, desc = driver.cuGetErrorString(err)
    name = name.decode() if ok == driver.CUresult.CUDA_SUCCESS else str(err)
    desc = desc.decode() if ok2 == driver.CUresult.CUDA_SUCCESS else ""
    return f"{name}: {desc}"


def check(result, what: str):
    """Unpack a cuda-python (CUresult, *values) tuple, raising CudaError on failure."""
    driver = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CudaError(f"{what} failed: {error_string(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=1)
def _raw_stream():
    """torch's current-stream handle as an int, without building a torch.cuda.Stream object (the
    function Inductor's generated code calls for the same purpose)."""
    from torch._C import _cuda_getCurrentRawStream, _cuda_getDevice
    return lambda: _cuda_getCurrentRawStream(_cuda_getDevice())


_lock = threading.Lock()
_modules: dict[tuple[Path, int], object] = {}

# Programmatic dependent launch (sm_90+, csrc/common/pdl.cuh): a kernel may start while the previous one on
# the stream finishes; it waits in-kernel before touching data. FUSEDOPS_PDL=0 (or set_pdl(False)) turns
# it off for every later launch.
_pdl_on = os.environ.get("FUSEDOPS_PDL", "1") not in ("", "0")
_tls = threading.local()


def set_pdl(enabled: bool) -> None:
    """Launch with programmatic dependent launch where the kernel supports it (default: on)."""
    global _pdl_on
    _pdl_on = bool(enabled)


def pdl_enabled() -> bool:
    return _pdl_on


def _pdl_config():
    """This thread's reusable CUlaunchConfig carrying the programmatic-serialization attribute (filling a
    kept one costs ~0.8 us, building one ~2.5 us)."""
    cfg = getattr(_tls, "pdl_config", None)
    if cfg is None:
        driver = _driver()
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        cfg = driver.CUlaunchConfig()
        cfg.attrs = [attr]
        cfg.numAttrs = 1
        _tls.pdl_config = cfg
    return cfg


def _ensure_context(device_index: int) -> None:
    """Make torch's primary context for this device current on this thread."""
    torch.cuda.init()
    driver = _driver()
    ctx = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(ctx) == 0 or torch.cuda.current_device() != device_index:
        torch.cuda.set_device(device_index)
        torch.cuda.current_stream(device_index)  # forces torch to bind its context
        ctx = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(ctx) == 0:
        raise CudaError(f"no CUDA context is current for device {device_index} after torch.cuda.init()")


def load_module(cubin: Path, device_index: int):
    key = (cubin, device_index)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            _ensure_context(device_index)
            mod = check(_driver().cuModuleLoadData(cubin.read_bytes()), f"cuModuleLoadData({cubin.name})")
            _modules[key] = mod
    return mod


@dataclass
class Kernel:
    """A __global__ function taking one params struct by value (see csrc/common/*.cuh)."""

    name: str
    function: object
    params_type: type  # the ctypes.Structure mirroring the kernel's params struct
    max_dynamic_smem: int = 48 * 1024
    pdl: bool = False  # the kernel calls pdl::enter() first and the device is sm_90+

    @classmethod
    def load(cls, cubin: Path, name: str, params_type: type, device_index: int, pdl: bool = False) -> "Kernel":
        driver = _driver()
        mod = load_module(cubin, device_index)
        fn = check(driver.cuModuleGetFunction(mod, name.encode()), f"cuModuleGetFunction({name})")
        # The Python struct must be byte-for-byte the C struct: check the kernel's own parameter size.
        offset, size = check(driver.cuFuncGetParamInfo(fn, 0), f"cuFuncGetParamInfo({name})")
        if size != ctypes.sizeof(params_type):
            raise CudaError(
                f"kernel {name}: params struct is {size} bytes in the cubin but "
                f"{ctypes.sizeof(params_type)} bytes in {params_type.__name__}"
            )
        kernel = cls(name, fn, params_type, pdl=pdl)
        # Without the opt-in attribute a launch may use 48 KB in all, static shared memory included.
        kernel.max_dynamic_smem = 48 * 1024 - kernel.attribute("SHARED_SIZE_BYTES")
        return kernel

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        if nbytes > self.max_dynamic_smem:
            driver = _driver()
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(driver.cuFuncSetAttribute(self.function, attr, nbytes),
                  f"cuFuncSetAttribute({self.name}, max dynamic smem={nbytes})")
            self.max_dynamic_smem = nbytes

    def attribute(self, name: str) -> int:
        """A CU_FUNC_ATTRIBUTE_* value, e.g. 'NUM_REGS', 'LOCAL_SIZE_BYTES', 'SHARED_SIZE_BYTES'."""
        driver = _driver()
        attr = getattr(driver.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{name}")
        return check(driver.cuFuncGetAttribute(attr, self.function), f"cuFuncGetAttribute({self.name}, {name})")

    def launch(self, grid, block, params, smem: int = 0, stream: int | None = None) -> None:
        """Launch on torch's current stream (or `stream`, a raw cudaStream_t handle)."""
        if smem:
            self.set_max_dynamic_smem(smem)
        if stream is None:
            stream = _raw_stream()()
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        driver = _driver()
        if self.pdl and _pdl_on:
            cfg = _pdl_config()
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = gx, gy, gz
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = bx, by, bz
            cfg.sharedMemBytes, cfg.hStream = smem, stream
            err, = driver.cuLaunchKernelEx(cfg, self.function, ctypes.addressof(args), 0)
        else:
            err, = driver.cuLaunchKernel(self.function, gx, gy, gz, bx, by, bz, smem, stream,
                                         ctypes.addressof(args), 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise CudaError(f"launch of {self.name} (grid={(gx, gy, gz)}, block={(bx, by, bz)}, smem={smem}) "
                            f"failed: {error_string(err)}")
