"""Launch the decode GEMVs of one Llama-3-8B layer at M = 1 a few times, for Nsight Compute:

    ncu --clock-control none -k regex:gemv --launch-skip 4 --launch-count 4 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats python3 perf/ncu_w4.py

(int4 gate/up, int4 down, bf16 gate/up, bf16 down, each three times; the profiled ones are the last round.)
"""
import torch

from fusedops import quant
from fusedops.ops import gemm_w4, gemv

torch.manual_seed(0)
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
h = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
res = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
w_gu = torch.randn(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
w_d = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.02
q_gu, q_d = quant.quantize(w_gu), quant.quantize(w_d)
ops = torch.ops.fusedops
for _ in range(3):
    ops.gate_up_silu_w4(x, *q_gu)
    ops.linear_residual_w4(h, *q_d, res)
    gemv.gemv_gate_up_silu(x, w_gu, 14336)
    gemv.gemv_linear(h, w_d, residual=res)
torch.cuda.synchronize()
print("done")
