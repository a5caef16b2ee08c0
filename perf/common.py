"""Timing helpers shared by every perf/ script: CUDA-event medians with L2 flush, CUDA-graph replay
timing for decode-size kernels, the copy-bandwidth and GEMM ceilings, and plain table output."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"
_l2_flush = None


def _flush_l2():
    global _l2_flush
    if _l2_flush is None:
        _l2_flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    _l2_flush.zero_()


def time_cuda(fn, warmup: int = 5, reps: int = 50, flush: bool = True) -> float:
    """Median microseconds of fn() over `reps` runs, each timed with CUDA events (L2 flushed)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush:
            _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_graph(fn, calls: int = 100, reps: int = 20) -> float:
    """Microseconds per fn() call under CUDA-graph replay: capture `calls` calls in one graph, replay,
    divide. This is the GPU time of a decode-size kernel, not Python launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_cuda(lambda: dst.copy_(src), flush=False, reps=20)
    return 2 * nbytes / us / 1e3


def gemm_tflops(n: int = 8192) -> float:
    """bf16 cuBLAS n^3 GEMM rate on random data (the tensor-core ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    us = time_cuda(lambda: a @ b, reps=10, flush=False)
    return 2 * n ** 3 / us / 1e6


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
