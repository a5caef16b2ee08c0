"""python -m fusedops {build,info}: ahead-of-time kernel builds and an environment report."""
from __future__ import annotations

import argparse
import os
import sys

from . import ops  # noqa: F401  (registers every kernel source)
from .runtime import compiler, registry


def cmd_build(args) -> int:
    archs = args.arch or ["sm_90a"]
    print(f"building {len(registry.SOURCES)} kernel sources for {', '.join(archs)} "
          f"into {compiler.cache_dir()} with {compiler.compiler_id()}", flush=True)
    results = registry.build_all(archs, args.only, jobs=args.jobs, progress=lambda m: print(m, flush=True))
    total = sum(r[2] for r in results)
    print(f"done: {len(results)} artifacts, {total:.1f} s of compiling")
    return 0


def cmd_info(args) -> int:
    import torch
    print(f"fusedops      {__import__('fusedops').__version__}")
    print(f"torch         {torch.__version__}")
    print(f"compiler      {compiler.compiler_id() if compiler.nvcc_path() else 'nvcc not found (NVRTC will be used)'}")
    try:
        print(f"cutlass       nvidia-cutlass {compiler.cutlass_version()}")
    except Exception as exc:  # noqa: BLE001 - report, do not fail, on a broken install
        print(f"cutlass       not available ({exc.__class__.__name__})")
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(dev)
        print(f"device        {props.name}, {props.multi_processor_count} SMs, "
              f"arch {registry.device_arch(torch.device('cuda', dev))}")
    else:
        print("device        none: no CUDA GPU visible. Kernels need a GPU; the CPU reference ops still run.")
    cache = compiler.cache_dir()
    files = sorted(p for p in cache.glob("*") if p.suffix in (".cubin", ".so")) if cache.is_dir() else []
    print(f"cache         {cache} ({len(files)} artifacts)")
    for p in files:
        print(f"  {p.name:<60} {p.stat().st_size / 1024:8.1f} KiB")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedops")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile every kernel ahead of time (no GPU needed)")
    b.add_argument("--arch", action="append", help="target arch, e.g. sm_90a (repeatable; default sm_90a)")
    b.add_argument("--only", nargs="*", help="build only these kernel sources")
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    sub.add_parser("info", help="device, toolkit and cache contents")
    args = parser.parse_args(argv)
    return {"build": cmd_build, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
