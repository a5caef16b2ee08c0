"""Softmax over the last dim, bf16: fusedops vs eager torch.softmax, Inductor and Liger, one shape per
kernel variant (warp per row, CTA per row, online), GPU times under CUDA-graph replay for all.
Run: PYTHONPATH=.:perf python3 perf/bench_softmax.py"""
import functools

import torch

from common import copy_bandwidth_gbs, inductor, liger_module, table, time_graph, versus
from fusedops.ops import softmax

SHAPES = [(65536, 256), (16384, 1024), (16384, 4096), (1024, 32768), (256, 128256), (16, 128256)]
LIGER_MAX_COLS = 65536  # Liger's softmax refuses longer rows (one Triton block per row)
big = functools.partial(time_graph, calls=10, reps=10)


def main():
    copy = copy_bandwidth_gbs()
    liger = liger_module("ops.softmax")
    compiled = inductor(softmax.softmax_reference)
    rows_out = []
    for rows, cols in SHAPES:
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        vec_variant = softmax.variant(cols, 8, True)[0]
        rows_out.append(versus(f"[{rows}x{cols}] ({vec_variant})", 2 * x.numel() * 2, {
            "fusedops": big(lambda: torch.ops.fusedops.softmax(x)),
            "eager": big(lambda: torch.softmax(x, -1)),
            "inductor": big(lambda: compiled(x)),
            "liger": big(lambda: liger.LigerSoftmaxFunction.apply(x))
            if liger and cols <= LIGER_MAX_COLS else None}, copy))
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(rows_out, "softmax bf16 (µs; x = speed-up of fusedops)", "softmax.md")


if __name__ == "__main__":
    main()
