"""Residual add + RMSNorm bf16: fusedops (one kernel) vs the eager pair, Inductor's fused version and
Liger's fused_add_rms_norm, at prefill and decode sizes; GPU times from CUDA-graph replay for all
(see bench_rmsnorm.py for why). Run: PYTHONPATH=.:perf python3 perf/bench_add_rmsnorm.py"""
import functools

import torch

from common import copy_bandwidth_gbs, inductor, liger_module, table, time_cuda, time_graph, versus
from fusedops.ops import add_rmsnorm, rmsnorm

EPS = 1e-6


def hf_pair(x, r, w, eps):
    """The eager pair as HF's decoder layer runs it: h = r + x in bf16, then LlamaRMSNorm of h."""
    h = r + x
    return rmsnorm.rms_norm_reference(h, w, eps), h
big = functools.partial(time_graph, calls=10, reps=10)


def impls():
    liger = liger_module("ops.fused_add_rms_norm")
    compiled = inductor(hf_pair)
    return {
        "fusedops": lambda x, r, w: torch.ops.fusedops.add_rms_norm(x, r, w, EPS),
        "eager": lambda x, r, w: hf_pair(x, r, w, EPS),
        "inductor": lambda x, r, w: compiled(x, r, w, EPS),
        "liger": (lambda x, r, w: liger.LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False))
        if liger else None,
    }


def main():
    copy = copy_bandwidth_gbs()
    fns = impls()
    rows_out, variants = [], []
    for rows, hidden, timer in ((16384, 4096, big), (16384, 8192, big), (1, 4096, time_graph),
                                (4, 4096, time_graph), (16, 4096, time_graph)):
        x, r = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
        nbytes = 4 * x.numel() * x.element_size() + w.numel() * w.element_size()
        times = {k: timer(lambda f=f: f(x, r, w)) if f else None for k, f in fns.items()}
        label = f"[{rows}x{hidden}]" + (", graph" if timer is time_graph else "")
        rows_out.append(versus(label, nbytes, times, copy))
        if rows > 16:
            rows_out[-1]["fusedops eager µs"] = time_cuda(lambda: fns["fusedops"](x, r, w))
            y, h = torch.empty_like(x), torch.empty_like(x)
            for items in (1, 2, 4, 8):
                if hidden // 8 <= items * 512:
                    t = big(lambda: add_rmsnorm.launch(x, r, w, y, h, EPS, items))
                    variants.append({"shape": label, "variant": f"c{items}", "µs": t,
                                     "% copy": 100 * nbytes / t / 1e3 / copy})
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(variants, "add+RMSNorm cached variants", "add_rmsnorm_variants.md")
    table(rows_out, "residual add + RMSNorm bf16 (µs; x = speed-up of fusedops)", "add_rmsnorm.md")


if __name__ == "__main__":
    main()
