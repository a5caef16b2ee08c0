"""GEMM benchmarks on Llama-3-8B shapes (hidden 4096, intermediate 14336, bf16) at M = 1 .. 8192.

    python perf/bench_gemm.py           the shipped routes (torch.ops.fusedops.*) vs cuBLAS baselines
    python perf/bench_gemm.py --sweep   every CUTLASS variant x scheduler setting (picks ROUTES)

Baselines: SwiGLU = cuBLAS gate GEMM + cuBLAS up GEMM + torch silu(g)*u; plain = torch.matmul
(F.linear); residual = F.linear + add. Every M is timed under CUDA-graph replay (GPU time, no host
launch cost; that is reported apart). Every timed output is also checked against fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import copy_bandwidth_gbs, cpu_us_per_call, gemm_tflops, table, time_graph  # noqa: E402

import fusedops.ops  # noqa: E402,F401
from fusedops.gemm_codegen import VARIANTS  # noqa: E402
from fusedops.ops import gemm  # noqa: E402

HIDDEN, INTER = 4096, 14336
M_VALUES = (1, 16, 128, 512, 2048, 8192)
# (op, label, N, K): the projections of one Llama-3-8B layer.
SHAPES = (("gate_up_silu", "gate/up N=2x14336 K=4096", INTER, HIDDEN),
          ("linear", "qkv N=6144 K=4096", 6144, HIDDEN),
          ("linear", "o_proj plain N=4096 K=4096", HIDDEN, HIDDEN),
          ("linear_residual", "o_proj N=4096 K=4096", HIDDEN, HIDDEN),
          ("linear_residual", "down N=4096 K=14336", HIDDEN, INTER))
TARGET = {"gate_up_silu": lambda m: 1.1 if m >= 128 else 1.0,
          "linear": lambda m: 0.95 if m >= 2048 else None,
          "linear_residual": lambda m: 1.05}
# Runtime tile-scheduler settings tried per variant in --sweep (no rebuild needed).
PERSISTENT_SETTINGS = tuple({"swizzle": s, "raster": r} for r in (0, 1, 2) for s in (1, 2, 4, 8))
STREAMK_SETTINGS = ({}, {"decomposition": 3}, {"decomposition": 1})


def timer(m):
    """GPU time per call under CUDA-graph replay at every M: eager timing of the CUTLASS path also
    counted its host launch cost (~45 us, table 'launch cost') wherever that outlasted the L2 flush."""
    return lambda fn: time_graph(fn, calls=20 if m <= 512 else 4, reps=10)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item() if torch.isfinite(out).all() else float("inf")


class Problem:
    """Inputs, baseline and fp32 reference of one (op, shape, M)."""

    def __init__(self, op, n, k, m):
        g = torch.Generator(device="cuda").manual_seed(m + n + k)
        self.op, self.m, self.n, self.k = op, m, n, k
        self.x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        rows = 2 * n if op == "gate_up_silu" else n
        self.w = (torch.randn(rows, k, device="cuda", generator=g) * k ** -0.5).bfloat16()
        self.res = torch.randn(m, n, device="cuda", generator=g).bfloat16() if op == "linear_residual" else None
        if op == "gate_up_silu":
            self.w_gate, self.w_up = self.w[:n], self.w[n:]
            self.w_gu = gemm.prepare_gate_up(self.w_gate, self.w_up, gemm.GATE_UP_BLOCK)
            xf = self.x.float()
            self.ref = F.silu(xf @ self.w_gate.float().T) * (xf @ self.w_up.float().T)
        else:
            self.ref = self.x.float() @ self.w.float().T + (self.res.float() if self.res is not None else 0)
        self.flops = 2 * m * rows * k

    def baseline(self):
        if self.op == "gate_up_silu":
            return F.silu(F.linear(self.x, self.w_gate)) * F.linear(self.x, self.w_up)
        if self.op == "linear":
            return torch.matmul(self.x, self.w.T)
        return self.res + F.linear(self.x, self.w)

    def one_gemm_fallback(self):
        """What the op runs on cuBLAS: one GEMM over the prepared weight (+ silu*mul)."""
        return gemm.gate_up_silu_torch(self.x, self.w_gu, gemm.GATE_UP_BLOCK)

    def through_op(self):
        if self.op == "gate_up_silu":
            return torch.ops.fusedops.gate_up_silu(self.x, self.w_gu, gemm.GATE_UP_BLOCK)
        if self.op == "linear":
            return torch.ops.fusedops.linear(self.x, self.w, None)
        return torch.ops.fusedops.linear_residual(self.x, self.w, self.res)

    def variant(self, route):
        if self.op == "gate_up_silu":
            return lambda: gemm.cutlass_gate_up_silu(self.x, self.w_gu, gemm.GATE_UP_BLOCK, route)
        return lambda: gemm.cutlass_linear(self.x, self.w, self.res, route)


def measure(problem, fn, t):
    err = rel_err(fn(), problem.ref)
    us = t(fn)
    return us, err


def sweep(peak):
    rows, best = [], []
    for op, label, n, k in SHAPES:
        for m in M_VALUES:
            p, t = Problem(op, n, k, m), timer(m)
            base_us, base_err = measure(p, p.baseline, t)
            cands = []
            if op == "gate_up_silu":
                cands.append(("cuBLAS one GEMM + silu*mul", *measure(p, p.one_gemm_fallback, t)))
            for v in VARIANTS:
                if (v.epilogue == "swiglu") != (op == "gate_up_silu"):
                    continue
                settings = STREAMK_SETTINGS if v.scheduler == "streamk" else PERSISTENT_SETTINGS
                for s in settings if m >= 128 or v.scheduler == "streamk" else settings[:1]:
                    route = gemm.Route(1 << 62, v.name, **s)
                    label_v = v.name.replace("gemm_", "").replace("_bf16", "") + "".join(
                        f" {key[:5]}={val}" for key, val in s.items())
                    cands.append((label_v, *measure(p, p.variant(route), t)))
            for name, us, err in cands:
                rows.append({"op": label, "M": m, "kernel": name, "us": us, "TFLOP/s": p.flops / us / 1e6,
                             "vs baseline": f"{base_us / us:.3f}", "rel err": f"{err:.1e}"})
            ok = [c for c in cands if c[2] <= 1e-2]
            top = min(ok, key=lambda c: c[1]) if ok else ("none correct", float("nan"), float("nan"))
            best.append({"op": label, "M": m, "baseline us": base_us, "best": top[0], "best us": top[1],
                         "speedup": f"{base_us / top[1]:.3f}", "TFLOP/s": p.flops / top[1] / 1e6,
                         "% peak": 100 * p.flops / top[1] / 1e6 / peak, "base err": f"{base_err:.1e}"})
            print(f"  {label} M={m}: baseline {base_us:.1f} us, best {top[0]} {top[1]:.1f} us", flush=True)
    return rows, best


def routes(peak):
    rows = []
    for op, label, n, k in SHAPES:
        for m in M_VALUES:
            p, t = Problem(op, n, k, m), timer(m)
            base_us, _ = measure(p, p.baseline, t)
            ours_us, err = measure(p, p.through_op, t)
            r = gemm.route_for(op, m, k)
            target = TARGET[op](m)
            rows.append({"op": label, "M": m, "route": (r.variant or "cuBLAS").replace("gemm_", ""),
                         "baseline us": base_us, "fusedops us": ours_us, "speedup": f"{base_us / ours_us:.3f}",
                         "target": f"{target:.2f}" if target else "-", "TFLOP/s": p.flops / ours_us / 1e6,
                         "% peak": 100 * p.flops / ours_us / 1e6 / peak, "rel err": f"{err:.1e}"})
    return rows


def host_overhead():
    """CPU microseconds per eager call (tiny problem, so the launch path is what is timed)."""
    x = torch.randn(1, 512, device="cuda").bfloat16()
    w = torch.randn(512, 512, device="cuda").bfloat16()
    rows = [{"call": "F.linear (cuBLAS)", "host us": cpu_us_per_call(lambda: F.linear(x, w))}]
    for v in VARIANTS:
        route = gemm.Route(1 << 62, v.name)
        fn = ((lambda r=route: gemm.cutlass_gate_up_silu(x, w, gemm.GATE_UP_BLOCK, r)) if v.epilogue == "swiglu"
              else (lambda r=route: gemm.cutlass_linear(x, w, None, r)))
        rows.append({"call": v.name, "host us": cpu_us_per_call(fn)})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="accepted for perf/gpu_check.sh; same run")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    peak, bw = gemm_tflops(), copy_bandwidth_gbs()
    head = (f"{props.name}, torch {torch.version.cuda}; bf16 peak (cuBLAS 8192^3, same run) {peak:.0f} TFLOP/s, "
            f"copy {bw:.0f} GB/s")
    print(head, flush=True)
    out_dir = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        rows, best = sweep(peak)
        (out_dir / "gemm_sweep.json").write_text(json.dumps({"head": head, "rows": rows, "best": best}))
        table(rows, f"GEMM sweep, all candidates - {head}", "gemm_sweep_all.md")
        table(best, f"GEMM sweep, best correct candidate per (op, M) - {head}", "gemm_sweep_best.md")
    else:
        table(host_overhead(), "GEMM launch cost on the host, eager, per call", "gemm_host.md")
        table(routes(peak), f"GEMM routes (fusedops ops vs cuBLAS baselines) - {head}", "gemm_routes.md")


if __name__ == "__main__":
    main()
