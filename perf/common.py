"""Helpers shared by every perf/ script: the package's timing and ceilings (fusedops.perf.timing,
re-exported here), baselines (Inductor, Liger), comparison rows and plain table output."""
from __future__ import annotations

from pathlib import Path

import torch

from fusedops.perf.timing import copy_bandwidth_gbs, gemm_tflops, time_cuda, time_graph  # noqa: F401

OUT_DIR = Path(__file__).resolve().parent / "out"


def inductor(fn):
    """torch.compile'd (Inductor, default mode) version of fn, for baselines."""
    return torch.compile(fn, dynamic=False)


def liger_module(name: str):
    """A Liger-Kernel module if installed, else None (the table then shows '-')."""
    try:
        import liger_kernel.ops as lops  # noqa: F401
        import importlib
        return importlib.import_module(f"liger_kernel.{name}")
    except ImportError:
        return None


def table(rows: list[dict], title: str, out_name: str | None = None) -> str:
    """Markdown table of rows (dicts with the same keys); printed and written under perf/out/."""
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out_name:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / out_name).write_text(text)
    return text


def versus(case: str, nbytes: int, times_us: dict, copy_gbs: float, ours: str = "fusedops") -> dict:
    """One table row for a memory-bound op: our time, GB/s, % of copy bandwidth, and each other
    implementation's time and our speed-up over it (None = not available, shown as '-')."""
    t = times_us[ours]
    row = {"case": case, f"{ours} µs": t, "GB/s": nbytes / t / 1e3, "% copy": 100 * nbytes / t / 1e3 / copy_gbs}
    for name, other in times_us.items():
        if name != ours:
            row[f"{name} µs"] = other if other is not None else "-"
            row[f"x {name}"] = f"{other / t:.2f}" if other is not None else "-"
    return row


def cpu_us_per_call(fn, calls: int = 2000) -> float:
    """Wall-clock microseconds per call of a small op in eager mode: the CPU launch overhead
    (the GPU work of a tiny kernel is shorter, so the CPU is the bottleneck)."""
    import time
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6
