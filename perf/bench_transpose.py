"""Transpose of the last two dims: fusedops vs eager x.transpose(-2, -1).contiguous() and Inductor, 2-D
and batched, bf16 and fp32, GPU times under CUDA-graph replay. Run: PYTHONPATH=.:perf python3 perf/bench_transpose.py"""
import functools

import torch

from common import copy_bandwidth_gbs, inductor, table, time_graph, versus
from fusedops.ops import transpose

CASES = [((8192, 8192), torch.bfloat16), ((8192, 8192), torch.float32), ((64, 1024, 1024), torch.bfloat16),
         ((32, 4096, 128), torch.bfloat16), ((8190, 8194), torch.bfloat16)]
big = functools.partial(time_graph, calls=10, reps=10)


def main():
    copy = copy_bandwidth_gbs()
    compiled = inductor(transpose.transpose_reference)
    rows_out = []
    for shape, dtype in CASES:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        rows_out.append(versus(f"{list(shape)} {str(dtype)[6:]}", 2 * x.numel() * x.element_size(), {
            "fusedops": big(lambda: torch.ops.fusedops.transpose(x)),
            "eager": big(lambda: transpose.transpose_reference(x)),
            "inductor": big(lambda: compiled(x))}, copy))
    print(f"copy bandwidth {copy:.0f} GB/s on {torch.cuda.get_device_name()}")
    table(rows_out, "transpose (µs; x = speed-up of fusedops)", "transpose.md")


if __name__ == "__main__":
    main()
