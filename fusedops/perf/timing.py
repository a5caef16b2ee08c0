"""GPU timing and the two ceilings every fusedops benchmark reports against: CUDA-event medians with an
L2 flush, per-call GPU time under CUDA-graph replay, device copy bandwidth and the bf16 GEMM rate.
Used by `python -m fusedops.perf` and, through perf/common.py, by the perf/ scripts."""
from __future__ import annotations

import statistics

import torch

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
