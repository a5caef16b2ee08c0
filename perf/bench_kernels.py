"""Every fusedops kernel against its baselines, in one run: measures the ceilings first (device copy
bandwidth, bf16 cuBLAS GEMM rate), then runs each perf/bench_<op>.py in this process, so all tables
share the same GPU state. Output: stdout and perf/out/bench_kernels.md.

Run: PYTHONPATH=.:perf python3 perf/bench_kernels.py [--quick] [--only rmsnorm rope ...]"""
import argparse
import contextlib
import importlib
import io
import sys
import time
import traceback
from pathlib import Path

import torch

from common import OUT_DIR, copy_bandwidth_gbs, gemm_tflops

# Order: the decode path first (what the backend uses most), the rest after.
BENCHES = ["rmsnorm", "add_rmsnorm", "rope", "silu_mul", "attention_decode", "attention", "gemm", "gemv",
           "softmax", "layernorm", "transpose"]


def run_bench(name: str, quick: bool) -> str:
    """Run perf/bench_<name>.py's main() here; return what it printed."""
    module = importlib.import_module(f"bench_{name}")
    argv, sys.argv = sys.argv, [f"bench_{name}.py"] + (["--quick"] if quick else [])
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            (getattr(module, "main", None) or (lambda: module.bench(quick)))()
    finally:
        sys.argv = argv
    return buf.getvalue()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", default=BENCHES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; kernel timings need one.")
        return
    props = torch.cuda.get_device_properties(0)
    report = [f"# fusedops kernels vs baselines — {props.name}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              f"Ceilings, this run: device copy {copy_bandwidth_gbs():.0f} GB/s (read + write), "
              f"bf16 GEMM 8192³ {gemm_tflops():.0f} TFLOP/s", ""]
    print("\n".join(report), flush=True)
    for name in args.only:
        t0 = time.perf_counter()
        try:
            text = run_bench(name, args.quick)
        except Exception:  # noqa: BLE001 - one broken bench must not hide the others' tables
            text = f"bench_{name} FAILED:\n{traceback.format_exc(limit=3)}"
        section = f"## {name} ({time.perf_counter() - t0:.0f} s)\n\n{text.strip()}\n"
        print(section, flush=True)
        report.append(section)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    Path(OUT_DIR / "bench_kernels.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
