"""SiLU·mul bf16: fusedops silu_mul (two tensors) and silu_mul_cat ([.., 2I]) vs eager, Inductor and
Liger, at prefill and decode sizes; GPU times from CUDA-graph replay for all (see bench_rmsnorm.py).
Run: PYTHONPATH=.:perf python3 perf/bench_silu_mul.py"""
import functools

import torch
import torch.nn.functional as F

from common import copy_bandwidth_gbs, inductor, liger_module, table, time_cuda, time_graph, versus
from fusedops.ops import silu_mul

INTER = 14336
SWEEP_THREADS = (64, 128, 256)  # CTA sizes tried for silu_mul_cat (DECODE_THREADS / THREADS in the op)
big = functools.partial(time_graph, calls=10, reps=10)


def cat_reference(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def main():
    copy = copy_bandwidth_gbs()
    liger = liger_module("ops.swiglu")
    pair = inductor(silu_mul.silu_mul_reference)
    cat = inductor(cat_reference)
    rows_out, sweep = [], []
    for rows, timer in ((8192, big), (1, time_graph), (4, time_graph), (16, time_graph)):
        g, u = (torch.randn(rows, INTER, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        gu = torch.cat([g, u], -1)
        nbytes = 3 * g.numel() * g.element_size()
        label = f"[{rows}x{INTER}]" + (", graph" if timer is time_graph else "")
        rows_out.append(versus(label + " pair", nbytes, {
            "fusedops": timer(lambda: torch.ops.fusedops.silu_mul(g, u)),
            "eager": timer(lambda: silu_mul.silu_mul_reference(g, u)),
            "inductor": timer(lambda: pair(g, u)),
            "liger": timer(lambda: liger.LigerSiLUMulFunction.apply(g, u)) if liger else None}, copy))
        rows_out.append(versus(label + " cat", nbytes, {
            "fusedops": timer(lambda: torch.ops.fusedops.silu_mul_cat(gu)),
            "eager": timer(lambda: cat_reference(gu)),
            "inductor": timer(lambda: cat(gu))}, copy))
        if timer is big:
            rows_out[-1]["fusedops eager µs"] = time_cuda(lambda: torch.ops.fusedops.silu_mul_cat(gu))
        out = torch.empty_like(g)
        for threads in SWEEP_THREADS:
            t = timer(lambda: silu_mul.launch(gu[:, :INTER], gu[:, INTER:], out, threads))
            sweep.append({"rows": rows, "threads": threads, "µs": t, "% copy": 100 * nbytes / t / 1e3 / copy})
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(sweep, "silu_mul_cat CTA size sweep", "silu_mul_threads.md")
    table(rows_out, "SiLU·mul bf16 (µs; x = speed-up of fusedops)", "silu_mul.md")


if __name__ == "__main__":
    main()
