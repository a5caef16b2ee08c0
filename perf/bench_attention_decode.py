"""Decode attention, bf16, Hq=32, Hkv=8, D=128, one new token: fusedops split-KV kernel vs SDPA on the
same static cache with HF's boolean mask (enable_gqa=True, and repeat_kv + SDPA as HF runs it with a
mask), under CUDA-graph replay and with CUDA events; KV-read bandwidth against the copy ceiling.
Run: PYTHONPATH=. python3 perf/bench_attention_decode.py [--quick]
     PYTHONPATH=. python3 perf/bench_attention_decode.py --small   (small cases for compute-sanitizer)"""
import argparse
import itertools
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from common import copy_bandwidth_gbs, cpu_us_per_call, table, time_cuda, time_graph
from fusedops.ops import attention_decode as dec
from fusedops.runtime import compiler

HQ, HKV, D = 32, 8, 128
BATCHES = [1, 8, 32]
CACHES = [1024, 2048, 4096, 8192, 16384, 32768]
ROTATE_BYTES = 256 << 20  # KV copies cycled per graph: 5x the 50 MB L2


def repeat_kv(x, n):
    """transformers' repeat_kv: [B, Hkv, L, D] -> [B, Hkv * n, L, D] (a copy)."""
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n, l, d).reshape(b, h * n, l, d)


def inputs(b, cache, valid, s=1):
    q = torch.randn(b, HQ, s, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, HKV, cache, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HKV, cache, D, device="cuda", dtype=torch.bfloat16)
    kv_len = torch.full((b,), valid, dtype=torch.int32, device="cuda")
    mask = (torch.arange(cache, device="cuda") < valid).view(1, 1, 1, cache).expand(b, 1, s, cache).contiguous()
    return q, k, v, mask, kv_len


def with_combine_kernel(fn):
    """fn with the splits merged by the separate combine kernel (the path before the in-kernel merge)."""
    def call():
        dec.MERGE_IN_SPLIT_KERNEL = False
        try:
            return fn()
        finally:
            dec.MERGE_IN_SPLIT_KERNEL = True
    return call


def impls(q, k, v, mask, kv_len):
    return {
        "fusedops": lambda: dec.decode_attention_cuda(q, k, v, mask, None, False, kv_len),
        "fusedops combine kernel": with_combine_kernel(
            lambda: dec.decode_attention_cuda(q, k, v, mask, None, False, kv_len)),
        "fusedops kv_len only": lambda: dec.decode_attention_cuda(q, k, v, None, None, False, kv_len),
        "fusedops mask only": lambda: dec.decode_attention_cuda(q, k, v, mask, None, False, None),
        "sdpa gqa+mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "repeat_kv+sdpa+mask": lambda: F.scaled_dot_product_attention(
            q, repeat_kv(k, HQ // HKV), repeat_kv(v, HQ // HKV), attn_mask=mask),
    }


def rotating(fns):
    """One callable that steps through `fns`: captured into a graph, call i uses input copy i % n, so
    the caches together exceed L2 and every call reads its KV from HBM, as a decode step does."""
    order = itertools.cycle(fns)
    return lambda: next(order)()


def measure(b, cache, valid, copy, s=1):
    kv_bytes = 2 * b * HKV * valid * D * 2
    copies = max(1, min(64, math.ceil(ROTATE_BYTES / (2 * b * HKV * cache * D * 2))))
    data = [inputs(b, cache, valid, s) for _ in range(copies)]
    sets = [impls(*d) for d in data]
    fns = {name: rotating([fs[name] for fs in sets]) for name in sets[0]}
    est_us = 5 + 5 * kv_bytes / 2.5e6  # the slowest (repeat_kv) path, to size the graph
    calls = max(copies, min(100, int(3e4 / est_us)))
    graph = {name: time_graph(fn, calls=calls, reps=10) for name, fn in fns.items()}
    events = {name: time_cuda(fns[name], reps=20) for name in ("fusedops", "sdpa gqa+mask")}
    ours = graph["fusedops"]
    row = {"B": b, "S": s, "cache": cache, "valid": valid, "splits": dec.default_splits(*data[0][:2]),
           "fusedops µs": ours, "GB/s": kv_bytes / ours / 1e3, "% copy": 100 * kv_bytes / ours / 1e3 / copy,
           "combine-kernel µs": graph["fusedops combine kernel"],
           "kv_len-only µs": graph["fusedops kv_len only"], "mask-only µs": graph["fusedops mask only"]}
    for name in ("sdpa gqa+mask", "repeat_kv+sdpa+mask"):
        row[f"{name} µs"] = graph[name]
        row[f"x {name}"] = f"{graph[name] / ours:.2f}"
    row["eager fusedops µs"] = events["fusedops"]
    row["eager sdpa gqa+mask µs"] = events["sdpa gqa+mask"]
    del data, sets, fns
    torch.cuda.empty_cache()
    return row


def ptxas_report():
    log = Path(str(compiler.build(dec.SOURCE, "sm_90a")) + ".log").read_text()
    rows = []
    for name, body in re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n(.*?)(?=ptxas info\s+: Compiling|\Z)",
                                 log, re.S):
        regs = re.search(r"Used (\d+) registers", body)
        spill = re.search(r"(\d+) bytes spill stores", body)
        rows.append({"kernel": name, "registers": regs.group(1) if regs else "?",
                     "spill stores (bytes)": spill.group(1) if spill else "?"})
    return sorted(rows, key=lambda r: r["kernel"])


def small_cases():
    """Every path once on small inputs: direct and split, mask, causal, kv_len, D 64/128/256, 32 rows."""
    gen = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)  # noqa: E731
    for d, hq, hkv, s, cache, splits in ((128, 32, 8, 1, 130, 1), (128, 32, 8, 1, 130, 3), (64, 16, 4, 8, 70, 2),
                                         (256, 8, 2, 4, 65, None), (128, 8, 4, 8, 200, 4)):
        b = 2
        q, k, v = r(b, hq, s, d), r(b, hkv, cache, d), r(b, hkv, cache, d)
        kv_len = torch.tensor([cache - 7, 3], dtype=torch.int32, device="cuda")
        mask = torch.rand(b, 1, s, cache, generator=gen).to("cuda") < 0.9
        dec.decode_attention_cuda(q, k, v, mask, None, True, kv_len, num_splits=splits)
        dec.decode_attention_cuda(q, k, v, None, None, False, None, num_splits=splits)
    torch.cuda.synchronize()
    print("small decode cases ran")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="B = 1, 8 and caches 1k, 8k only")
    parser.add_argument("--small", action="store_true", help="small cases only (compute-sanitizer)")
    args = parser.parse_args()
    if args.small:
        small_cases()
        return
    copy = copy_bandwidth_gbs()
    rows = [measure(1, 1024, 520, copy)]  # the e2e benchmark's decode step: 520 valid keys of 1024
    for b in BATCHES[:2] if args.quick else BATCHES:
        for cache in [1024, 8192] if args.quick else CACHES:
            rows.append(measure(b, cache, cache, copy))
    rows += [measure(b, 4096, 4096, copy, s) for b, s in ((1, 8), (8, 4), (8, 8))]  # speculative steps
    q, k, v, mask, kv_len = inputs(1, 1024, 520)
    overhead = [{"call": "decode_attention_cuda, B=1, cache 1024, eager", "CPU µs per call": cpu_us_per_call(
        lambda: dec.decode_attention_cuda(q, k, v, mask, None, False, kv_len))}]
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(ptxas_report(), "attention decode kernels: ptxas -v (sm_90a)", "attention_decode_ptxas.md")
    table(overhead, "Python launch overhead (no graph)", "attention_decode_overhead.md")
    table(rows, "Decode attention bf16, Hq=32, Hkv=8, D=128: µs per call under CUDA-graph replay, KV cycled "
          "through > L2 (x = SDPA time / fusedops time; eager = CUDA events incl. launch, L2 flushed)",
          "attention_decode.md")


if __name__ == "__main__":
    main()
