"""LayerNorm bf16 (weight and bias): fusedops vs eager F.layer_norm, Inductor and Liger at prefill and
decode sizes, GPU times under CUDA-graph replay for all. Run: PYTHONPATH=.:perf python3 perf/bench_layernorm.py"""
import functools

import torch

from common import copy_bandwidth_gbs, inductor, liger_module, table, time_graph, versus
from fusedops.ops import layernorm

EPS = 1e-5
SHAPES = [(16384, 768), (16384, 4096), (16384, 8192), (1, 4096), (16, 4096)]
SWEEP = {768: ("c1", "c2", "c4"), 4096: ("c1", "c2", "c4"), 8192: ("c2", "c4")}  # variants tried at 16384 rows
big = functools.partial(time_graph, calls=10, reps=10)


def main():
    copy = copy_bandwidth_gbs()
    liger = liger_module("ops.layer_norm")
    compiled = inductor(layernorm.layer_norm_reference)
    rows_out, sweep = [], []
    for rows, hidden in SHAPES:
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        w, b = (torch.randn(hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        timer = big if rows > 16 else time_graph
        rows_out.append(versus(f"[{rows}x{hidden}]", 2 * x.numel() * 2 + 4 * hidden, {
            "fusedops": timer(lambda: torch.ops.fusedops.layer_norm(x, w, b, EPS)),
            "eager": timer(lambda: layernorm.layer_norm_reference(x, w, b, EPS)),
            "inductor": timer(lambda: compiled(x, w, b, EPS)),
            "liger": timer(lambda: liger.LigerLayerNormFunction.apply(x, w, b, EPS)) if liger else None}, copy))
        out = torch.empty_like(x)
        for variant in SWEEP.get(hidden, ()) if rows > 16 else ():
            _, threads = layernorm.plan(hidden, 8, True, variant)
            t = big(lambda: layernorm.launch(x, w, b, out, EPS, variant))
            sweep.append({"shape": f"[{rows}x{hidden}]", "variant": variant, "threads": threads, "µs": t,
                          "% copy": 100 * (2 * x.numel() * 2 + 4 * hidden) / t / 1e3 / copy})
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(sweep, "LayerNorm variants", "layernorm_variants.md")
    table(rows_out, "LayerNorm bf16 (µs; x = speed-up of fusedops)", "layernorm.md")


if __name__ == "__main__":
    main()
