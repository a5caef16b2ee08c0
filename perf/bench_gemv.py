"""Decode GEMV (csrc/gemv.cu) on Llama-3-8B projections at M = 1, 2, 4, 8, 16 against cuBLAS + the torch
epilogue ops (and, for gate/up, the CUTLASS SwiGLU kernel that served M <= 512 before), with % of the device
copy bandwidth measured in the same run.

    python perf/bench_gemv.py [--quick]     tuning sweep at M = 1 / 8 / 16, then the table at gemv.TUNING

Every time is GPU time per call under CUDA-graph replay (20 calls a graph). The calls cycle through enough
copies of the weight (>= 256 MB) that none is served from the 50 MB L2. Bytes = weight + x + residual +
output. Every timed output is checked against fp32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import copy_bandwidth_gbs, table, time_graph  # noqa: E402

from fusedops.ops import gemm, gemv  # noqa: E402

HIDDEN, INTER, VOCAB = 4096, 14336, 128256
M_VALUES = (1, 2, 4, 8, 16)
SWEEP_M = (1, 8, 16)
# (label, op, N, K); N of gate/up = the intermediate size (the weight has 2N rows).
SHAPES = (("qkv N=6144 K=4096", "linear", 6144, HIDDEN),
          ("o_proj+res N=4096 K=4096", "residual", HIDDEN, HIDDEN),
          ("down+res N=4096 K=14336", "residual", HIDDEN, INTER),
          ("gate/up+silu I=14336 K=4096", "swiglu", INTER, HIDDEN),
          ("lm_head N=128256 K=4096", "linear", VOCAB, HIDDEN))
ROTATE_BYTES = 256 << 20


class Problem:
    def __init__(self, op, n, k, m):
        g = torch.Generator(device="cuda").manual_seed(m + n + k)
        self.op, self.m = op, m
        rows = 2 * n if op == "swiglu" else n
        w = (torch.randn(rows, k, device="cuda", generator=g) * k ** -0.5).bfloat16()
        self.x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        self.res = torch.randn(m, n, device="cuda", generator=g).bfloat16() if op == "residual" else None
        copies = max(1, -(-ROTATE_BYTES // w.nbytes))
        self.bytes = w.nbytes + self.x.nbytes + m * n * 2 * (2 if self.res is not None else 1)
        xf = self.x.float()
        if op == "swiglu":
            self.ws = [gemm.prepare_gate_up(w[:n], w[n:], gemm.GATE_UP_BLOCK)] + [None] * (copies - 1)
            self.ref = F.silu(xf @ w[:n].float().T) * (xf @ w[n:].float().T)
            self.halves = [(w[:n], w[n:])] + [None] * (copies - 1)
            for i in range(1, copies):
                self.ws[i] = self.ws[0].clone()
                self.halves[i] = (self.halves[0][0].clone(), self.halves[0][1].clone())
        else:
            self.ws = [w] + [w.clone() for _ in range(copies - 1)]
            self.ref = xf @ w.float().T + (self.res.float() if self.res is not None else 0)
        self.turn = 0

    def _next(self):
        self.turn = (self.turn + 1) % len(self.ws)
        return self.turn

    def baseline(self):
        i = self._next()
        if self.op == "swiglu":
            wg, wu = self.halves[i]
            return F.silu(F.linear(self.x, wg)) * F.linear(self.x, wu)
        y = F.linear(self.x, self.ws[i])
        return self.res + y if self.res is not None else y

    def cutlass(self):
        route = gemm.route_for("gate_up_silu", self.m, self.x.shape[1])
        return gemm.cutlass_gate_up_silu(self.x, self.ws[self._next()], gemm.GATE_UP_BLOCK, route)

    def gemv(self, tuning=None):
        w = self.ws[self._next()]
        if self.op == "swiglu":
            return gemv.gemv_gate_up_silu(self.x, w, gemm.GATE_UP_BLOCK, tuning=tuning)
        return gemv.gemv_linear(self.x, w, residual=self.res, tuning=tuning)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else float("inf")


def measure(p, fn):
    err = rel_err(fn(), p.ref)
    return time_graph(fn, calls=20, reps=10), err


def sweep(copy_gbs):
    rows = []
    for label, op, n, k in SHAPES:
        for m in SWEEP_M:
            p = Problem(op, n, k, m)
            for tuning in gemv.TUNINGS["swiglu" if op == "swiglu" else "linear"]:
                us, err = measure(p, lambda: p.gemv(tuning))
                rows.append({"shape": label, "M": m, "warps x unroll": f"{tuning[0]}x{tuning[1]}", "µs": us,
                             "% copy": 100 * p.bytes / us / 1e3 / copy_gbs, "rel err": f"{err:.1e}"})
            del p
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the tuning sweep")
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy bandwidth this run: {copy_gbs:.0f} GB/s", flush=True)
    if not args.quick:
        table(sweep(copy_gbs), "GEMV tunings (warps x 16-byte loads per row per lane)", "gemv_sweep.md")
    cutlass = gemm.cutlass_available(torch.cuda.current_device())
    rows = []
    for label, op, n, k in SHAPES:
        for m in M_VALUES:
            p = Problem(op, n, k, m)
            base_us, base_err = measure(p, p.baseline)
            us, err = measure(p, p.gemv)
            row = {"shape": label, "M": m, "cuBLAS+torch µs": base_us, "GEMV µs": us,
                   "GB/s": p.bytes / us / 1e3, "% copy": 100 * p.bytes / us / 1e3 / copy_gbs,
                   "cuBLAS % copy": 100 * p.bytes / base_us / 1e3 / copy_gbs, "x cuBLAS": f"{base_us / us:.3f}"}
            if op == "swiglu":
                cut_us = measure(p, p.cutlass)[0] if cutlass else None
                row["CUTLASS µs"] = cut_us if cut_us else "-"
                row["x CUTLASS"] = f"{cut_us / us:.3f}" if cut_us else "-"
            else:
                row["CUTLASS µs"], row["x CUTLASS"] = "-", "-"
            row["rel err (cuBLAS)"] = f"{err:.1e} ({base_err:.1e})"
            rows.append(row)
            del p
    device = torch.device("cuda", torch.cuda.current_device())
    tunings = {f"{kind} M<={m}": gemv.default_tuning(kind, m, device) for kind in gemv.TUNINGS for m in (8, 16)}
    table(rows, f"GEMV vs cuBLAS, bf16, CUDA-graph replay, copy {copy_gbs:.0f} GB/s, tunings {tunings}",
          "gemv.md")


if __name__ == "__main__":
    main()
