"""RMSNorm bf16: fusedops vs eager, Inductor and Liger at prefill and decode sizes, the cached-variant
sweep behind CACHED_THREADS, and the Python launch overhead. GPU times come from CUDA-graph replay for
every implementation alike (time_cuda's per-call events would also count the gap left while Python
launches the kernel, which our ctypes launch path makes long); "fusedops eager µs" shows that figure.
Run: PYTHONPATH=.:perf python3 perf/bench_rmsnorm.py"""
import functools

import torch

from common import (copy_bandwidth_gbs, cpu_us_per_call, inductor, liger_module, table, time_cuda,
                    time_graph, versus)
from fusedops.ops import rmsnorm

EPS = 1e-6
PREFILL = [(16384, 4096), (16384, 8192)]
DECODE_ROWS = [1, 4, 16]
big = functools.partial(time_graph, calls=10, reps=10)  # GPU time of a prefill-size call


def impls():
    liger = liger_module("ops.rms_norm")
    compiled = inductor(rmsnorm.rms_norm_reference)
    return {
        "fusedops": lambda x, w: torch.ops.fusedops.rms_norm(x, w, EPS),
        "eager": lambda x, w: rmsnorm.rms_norm_reference(x, w, EPS),
        "inductor": lambda x, w: compiled(x, w, EPS),
        "liger": (lambda x, w: liger.LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)) if liger else None,
    }


def inputs(rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    return x, torch.randn(hidden, device="cuda", dtype=torch.bfloat16)


def main():
    copy = copy_bandwidth_gbs()
    fns = impls()
    rows_out, variants = [], []
    for rows, hidden in PREFILL:
        x, w = inputs(rows, hidden)
        nbytes = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
        times = {k: big(lambda f=f: f(x, w)) if f else None for k, f in fns.items()}
        rows_out.append(versus(f"[{rows}x{hidden}]", nbytes, times, copy))
        rows_out[-1]["fusedops eager µs"] = time_cuda(lambda: fns["fusedops"](x, w))
        out = torch.empty_like(x)
        for items in rmsnorm.CACHED_ITEMS:
            if hidden // 8 <= items * rmsnorm.CACHED_THREADS[items]:
                variant, threads = rmsnorm.row_variant(hidden, 8, True, items)
                t = big(lambda: rmsnorm.launch(x, w, out, EPS, items))
                variants.append({"shape": f"[{rows}x{hidden}]", "variant": variant, "threads": threads,
                                 "µs": t, "% copy": 100 * nbytes / t / 1e3 / copy})
    for rows in DECODE_ROWS:
        x, w = inputs(rows, 4096)
        nbytes = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
        times = {k: time_graph(lambda f=f: f(x, w)) if f else None for k, f in fns.items()}
        rows_out.append(versus(f"decode [{rows}x4096], graph", nbytes, times, copy))
    x, w = inputs(1, 4096)
    out = torch.empty_like(x)
    name, threads = rmsnorm.kernel_plan(x, w, out)
    k = rmsnorm.kernel(rmsnorm.SOURCE, name, rmsnorm.RmsNormParams, x.device)
    params = rmsnorm.RmsNormParams(out.data_ptr(), x.data_ptr(), w.data_ptr(), 1, 4096, 4096, 4096, EPS)

    overhead = [{"what": "fusedops.rms_norm [1x4096], eager call",
                 "µs": cpu_us_per_call(lambda: fns["fusedops"](x, w))},
                {"what": "raw kernel launch (rmsnorm.launch)", "µs": cpu_us_per_call(
                    lambda: rmsnorm.launch(x, w, torch.empty_like(x), EPS))},
                {"what": "Kernel.launch alone (cuda-python cuLaunchKernel, raw stream handle)",
                 "µs": cpu_us_per_call(lambda: k.launch((1,), (threads,), params))},
                {"what": "inductor [1x4096], eager call", "µs": cpu_us_per_call(lambda: fns["inductor"](x, w))},
                {"what": "fusedops.rms_norm under graph replay", "µs": time_graph(lambda: fns["fusedops"](x, w))}]
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(variants, "RMSNorm cached variants (ITEMS vectors per thread)", "rmsnorm_variants.md")
    table(overhead, "RMSNorm launch overhead", "rmsnorm_overhead.md")
    table(rows_out, "RMSNorm bf16 (µs; x = speed-up of fusedops)", "rmsnorm.md")


if __name__ == "__main__":
    main()
