"""int4 weight-only (W4A16) decode: per-GEMM kernel GB/s vs copy bandwidth and vs the bf16 cuBLAS GEMM
(Llama-3-8B shapes, M = 1/4/8/16, CUDA-graph replay, weights cycled through more than L2), the prefill
route (dequantize + cuBLAS vs the GEMV) and end to end: fusedops bf16 vs fusedops int4 decode on a
Llama-3-8B-shape model (random weights, StaticCache, CUDA graphs), roofline, logits error, greedy agreement.

    python3 perf/bench_w4.py [--part kernels|e2e|all] [--layers 32] [--steps 64]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from common import copy_bandwidth_gbs, table, time_graph

from fusedops import quant
from fusedops.ops import gemm_w4

OPS = torch.ops.fusedops
SHAPES = [("q/k/v", 6144, 4096, "linear"), ("o_proj", 4096, 4096, "linear_residual"),
          ("gate/up", 2 * 14336, 4096, "gate_up_silu"), ("down", 4096, 14336, "linear_residual")]
TOKENS = (1, 4, 8, 16)
CYCLE_BYTES = 256 << 20      # weight copies per timing loop: > 5x the 50 MB L2, so every call reads HBM
CONTEXT = 512                # tokens before decode (ANCHORS.md's setup), StaticCache of CACHE_LEN
CACHE_LEN = 1024


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(CYCLE_BYTES / nbytes))


def cycled(fns):
    """One callable per graph slot, cycling through the copies at capture time."""
    state = {"i": 0}

    def call():
        fn = fns[state["i"] % len(fns)]
        state["i"] += 1
        return fn()
    return call, len(fns)


def int4_call(op, x, q, res):
    if op == "linear":
        return lambda: OPS.linear_w4(x, *q)
    if op == "linear_residual":
        return lambda: OPS.linear_residual_w4(x, *q, res)
    return lambda: OPS.gate_up_silu_w4(x, *q)


def kernels(copy_gbs: float) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k, op in SHAPES:
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        q = quant.quantize(w)
        qbytes = q.nbytes()
        q_copies = [quant.QuantizedWeight(q.qweight.clone(), q.scales.clone(), q.zeros.clone(), q.group)
                    for _ in range(copies_for(qbytes))]
        w_copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            fn, calls = cycled([int4_call(op, x, qc, res) for qc in q_copies])
            t4 = time_graph(fn, calls=calls * 4)
            fn, calls = cycled([lambda wc=wc: F.linear(x, wc) for wc in w_copies])
            t16 = time_graph(fn, calls=calls * 4)
            n_out = n // 2 if op == "gate_up_silu" else n
            moved = qbytes + x.numel() * 2 + m * n_out * 2 * (2 if op == "linear_residual" else 1)
            route = "GEMV" if m <= gemm_w4.MAX_GEMV_TOKENS else "dequant+cuBLAS"
            row = {"GEMM": name, "N x K": f"{n}x{k}", "M": m, "int4 route": route, "int4 µs": t4,
                   "int4 GB/s": moved / t4 / 1e3,
                   "% copy": 100 * moved / t4 / 1e3 / copy_gbs, "bf16 cuBLAS µs": t16,
                   "bf16 GB/s": n * k * 2 / t16 / 1e3, "x bf16": f"{t16 / t4:.2f}", "dequant+cuBLAS µs": "-"}
            if m == gemm_w4.MAX_GEMV_TOKENS:  # the other route at the GEMV's largest M: which is faster
                fn, calls = cycled([lambda qc=qc: F.linear(x, gemm_w4.dequantize_cuda(*qc, torch.bfloat16))
                                    for qc in q_copies])
                row["dequant+cuBLAS µs"] = time_graph(fn, calls=calls * 2)
            rows.append(row)
        del q_copies, w_copies, w
        torch.cuda.empty_cache()
    return rows


def prefill_route() -> list[dict]:
    """M above the GEMV range: dequantize + cuBLAS vs the bf16 GEMM alone (gate/up shape)."""
    rows = []
    n, k = 2 * 14336, 4096
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q = quant.quantize(w)
    for m in (17, 64, 512, 2048):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t4 = time_graph(lambda: OPS.gate_up_silu_w4(x, *q), calls=10)
        t16 = time_graph(lambda: OPS.gate_up_silu(x, w, n // 2), calls=10)
        rows.append({"M": m, "int4 gate_up_silu µs (dequant + cuBLAS)": t4, "bf16 gate_up_silu µs": t16,
                     "x bf16": f"{t16 / t4:.2f}"})
    return rows


def e2e(layers: int, steps: int, copy_gbs: float, preset: str = "llama3-8b") -> list[dict]:
    from fusedops.perf.measure import CachePool, StepClock, forward, parity_logits, random_tokens
    from fusedops.perf.models import cast_parameters, describe, preset_config, random_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the code
    model = random_model(preset_config(preset, layers), device)
    cast_parameters(model, torch.bfloat16)
    facts = describe(model)
    pool = CachePool()
    prompt = random_tokens((1, 16), model.config.vocab_size, device, 1)
    context = random_tokens((1, CONTEXT), model.config.vocab_size, device, 2)
    results, ref = [], {}
    variants = [("fusedops bf16", {}), ("fusedops int4", {"weights": "int4"}),
                ("fusedops int4 + int4 lm_head", {"weights": "int4", "int4_lm_head": True}),
                ("fusedops bf16, weights = int4 round trip (lm_head bf16)", {})]
    for label, options in variants:
        torch._dynamo.reset()
        if label == variants[-1][0]:  # same weights as "fusedops int4": isolates the kernels' own error
            dequantize_linears(model)
            ref["logits"], ref["argmax"] = ref["int4"], ref["int4"][:-1].argmax(-1)
        fn = torch.compile(model, backend="fusedops", options={"clone_outputs": False, **options})
        t0 = time.perf_counter()
        with torch.no_grad():
            if "forced" not in ref:  # the bf16 path's own greedy tokens, fed to every variant
                cache = pool.get(model, 1, CACHE_LEN)
                ids, pos, forced = prompt, torch.arange(prompt.shape[1], device=device), []
                for _ in range(steps):
                    torch.compiler.cudagraph_mark_step_begin()
                    ids = forward(fn, ids, cache, pos).argmax(-1, keepdim=True)
                    forced.append(int(ids))
                    pos = pos[-1:] + 1
                ref["forced"] = torch.tensor(forced, device=device)
            logits, _ = parity_logits(fn, model, pool, prompt, ref["forced"], CACHE_LEN)
            compile_s = time.perf_counter() - t0
            ref.setdefault("logits", logits)
            ref.setdefault("argmax", ref["forced"].cpu())
            if options == {"weights": "int4"}:
                ref["int4"] = logits
            rel = ((logits.double() - ref["logits"].double()).norm() / ref["logits"].double().norm()).item()
            agree = (logits[:-1].argmax(-1) == ref["argmax"]).double().mean().item()
            # decode speed: eager prefill of CONTEXT tokens, then graph-replayed steps
            cache = pool.get(model, 1, CACHE_LEN)
            ids = forward(model, context, cache, torch.arange(CONTEXT, device=device)).argmax(-1, keepdim=True)
            pos = torch.tensor([CONTEXT], device=device)
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                ids, pos = forward(fn, ids, cache, pos).argmax(-1, keepdim=True), pos + 1
            clock = StepClock(device)
            for _ in range(steps):
                torch.compiler.cudagraph_mark_step_begin()
                ids, pos = forward(fn, ids, cache, pos).argmax(-1, keepdim=True), pos + 1
                clock.tick()
        step_ms = sum(clock.intervals_ms()) / steps
        results.append(dict(label=label, step_ms=step_ms, rel=rel, agree=agree, compile_s=compile_s,
                            weight_bytes=streamed_bytes(model, facts, options)))
    kv = 2 * facts["layers"] * facts["kv_heads"] * (CONTEXT + steps / 2) * facts["head_dim"] * 2
    base = results[0]["step_ms"]
    return [{"decode b=1 (%d layers)" % layers: r["label"], "step ms": r["step_ms"], "tok/s": 1e3 / r["step_ms"],
             "x bf16": f"{base / r['step_ms']:.2f}",
             "roofline ms": (r["weight_bytes"] + kv) / copy_gbs / 1e6,
             "% roofline": 100 * (r["weight_bytes"] + kv) / copy_gbs / 1e6 / r["step_ms"],
             "logits rel err vs bf16 (last row: vs int4)": f"{r['rel']:.3e}",
             "greedy agree (forced)": f"{100 * r['agree']:.1f} %",
             "compile+parity s": r["compile_s"]} for r in results]


def dequantize_linears(model) -> None:
    """Every projection but lm_head replaced in place by its int4 round trip (what the int4 ops multiply)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head" and mod.in_features % quant.GROUP == 0:
                mod.weight.copy_(quant.dequantize(*quant.quantize(mod.weight)))


def streamed_bytes(model, facts, options) -> float:
    """Bytes one decode step reads: int4 projections (incl. scales and zeros) + every other weight in bf16."""
    total = facts["streamed_params"] * 2
    if options.get("weights") != "int4":
        return total
    per_group = 128 // 2 + 2 * 2   # 64 B of nibbles + bf16 scale + bf16 zero per 128 weights
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name != "lm_head" or options.get("int4_lm_head")):
            total += mod.weight.numel() / 128 * per_group - mod.weight.numel() * 2
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("kernels", "e2e", "all"), default="all")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--preset", default="llama3-8b", help="fusedops.perf.models preset for --part e2e")
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if args.part in ("kernels", "all"):
        table(kernels(copy_gbs), f"int4 GEMV vs bf16 cuBLAS (graph replay, copy {copy_gbs:.0f} GB/s)", "bench_w4_kernels.md")
        table(prefill_route(), "int4 above the GEMV range: dequantize + cuBLAS", "bench_w4_prefill.md")
    if args.part in ("e2e", "all"):
        table(e2e(args.layers, args.steps, copy_gbs, args.preset), f"{args.preset} shape decode, batch 1 (copy {copy_gbs:.0f} GB/s)",
              "bench_w4_e2e.md")


if __name__ == "__main__":
    main()
