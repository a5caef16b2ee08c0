"""int4 weight-only (W4A16) decode: per-GEMM kernel GB/s vs copy bandwidth, vs the bf16 cuBLAS GEMM and
the bf16 fusedops GEMV (Llama-3-8B shapes, M = 1/4/8/16, CUDA-graph replay, weights cycled through more
than L2), every compiled tuning of the int4 GEMV, the other route at M = 16 (dequantize + cuBLAS), the
prefill route, and end to end: fusedops bf16 vs fusedops int4 decode on a Llama-3-8B-shape model (random
weights, StaticCache, CUDA graphs), roofline, logits error, greedy agreement.

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
from fusedops.ops import attention_decode, gemm_w4, gemv

OPS = torch.ops.fusedops
SHAPES = [("q/k/v", 6144, 4096, "linear"), ("o_proj", 4096, 4096, "linear_residual"),
          ("gate/up", 2 * 14336, 4096, "gate_up_silu"), ("down", 4096, 14336, "linear_residual")]
TOKENS = (1, 4, 8, 16)
CYCLE_BYTES = 256 << 20      # weight copies per timing loop: > 5x the 50 MB L2, so every call reads HBM
CONTEXT = 512                # tokens before decode (ANCHORS.md's setup), StaticCache of CACHE_LEN
CACHE_LEN = 1024
PREFETCH_SHIPPED = gemv.PREFETCH


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


def tuned_call(op, x, q, res, out, tuning):
    """The int4 GEMV kernel alone with one compiled tuning (no op dispatch, preallocated output)."""
    r = res if op == "linear_residual" else None
    return lambda: gemm_w4.launch_gemv(op, x, q.qweight, q.scales, q.zeros, q.group, out, r, tuning)


def bf16_gemv_call(op, x, w, res):
    """The bf16 fusedops path at decode sizes (csrc/gemv.cu) on the same projection."""
    if op == "linear":
        return lambda: gemv.gemv_linear(x, w)
    if op == "linear_residual":
        return lambda: gemv.gemv_linear(x, w, residual=res)
    return lambda: gemv.gemv_gate_up_silu(x, w, w.shape[0] // 2)


def time_cycled(make, copies, per_copy_calls=4):
    fn, calls = cycled([make(c) for c in copies])
    return time_graph(fn, calls=calls * per_copy_calls)


def kernels(copy_gbs: float) -> tuple[list[dict], list[dict], dict]:
    """Per-GEMM rows, the tuning sweep, and {(GEMM, M, tuning): µs} for swept_tunings."""
    rows, sweep, times = [], [], {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k, op in SHAPES:
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        q = quant.quantize(w)
        qbytes = q.nbytes()
        q_copies = [quant.QuantizedWeight(q.qweight.clone(), q.scales.clone(), q.zeros.clone(), q.group)
                    for _ in range(copies_for(qbytes))]
        w_copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
        kind = gemm_w4.KINDS[op]
        n_out = n // 2 if op == "gate_up_silu" else n
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(m, n_out, device="cuda", dtype=torch.bfloat16)
            moved = qbytes + x.numel() * 2 + m * n_out * 2 * (2 if op == "linear_residual" else 1)
            t4 = time_cycled(lambda qc: int4_call(op, x, qc, res), q_copies)
            t16 = time_cycled(lambda wc: lambda: F.linear(x, wc), w_copies)
            tg = time_cycled(lambda wc: bf16_gemv_call(op, x, wc, res), w_copies)
            route = "GEMV" if m <= gemm_w4.MAX_GEMV_TOKENS else "dequant+cuBLAS"
            row = {"GEMM": name, "N x K": f"{n}x{k}", "M": m, "int4 route": route, "int4 µs": t4,
                   "int4 GB/s": moved / t4 / 1e3, "% copy": 100 * moved / t4 / 1e3 / copy_gbs,
                   "bf16 cuBLAS µs": t16, "x cuBLAS": f"{t16 / t4:.2f}", "bf16 GEMV µs": tg,
                   "x bf16 GEMV": f"{tg / t4:.2f}", "dequant+cuBLAS µs": "-"}
            if m == TOKENS[-1]:  # the other route at the largest decode M: which is faster
                row["dequant+cuBLAS µs"] = time_cycled(
                    lambda qc: lambda: F.linear(x, gemm_w4.dequantize_cuda(*qc, torch.bfloat16)), q_copies, 2)
            rows.append(row)
            out = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
            tile = gemm_w4.token_tile(m)
            default = gemm_w4.default_tuning(kind, tile, -(-n_out // gemm_w4.ROWS_PER_CTA),
                                             torch.cuda.get_device_properties(0).multi_processor_count)
            for tuning in gemm_w4.TUNINGS[kind, tile]:
                t = time_cycled(lambda qc: tuned_call(op, x, qc, res, out, tuning), q_copies)
                times[name, m, tuning] = t
                sweep.append({"GEMM": name, "M": m, "warps x loads, min CTAs": "%d x %d, %d" % tuning,
                              "default": "yes" if tuning == default else "", "µs": t,
                              "% copy": 100 * moved / t / 1e3 / copy_gbs})
        del q_copies, w_copies, w
        torch.cuda.empty_cache()
    return rows, sweep, times


def swept_tunings(times: dict) -> tuple[dict, dict]:
    """gemm_w4.TUNING / WIDE_LINEAR_TUNING from this run's sweep: per token tile (timed at M = 1 and 16), the
    fastest tuning of q/k/v (the wide linear grid), of o_proj + down_proj together (the narrow one) and of
    gate/up; keys the sweep did not time keep their shipped value."""
    tuning, wide = dict(gemm_w4.TUNING), dict(gemm_w4.WIDE_LINEAR_TUNING)
    for tile, m in ((8, 1), (16, 16)):
        if m not in TOKENS:
            continue
        fastest = lambda names, kind: min(gemm_w4.TUNINGS[kind, tile],
                                          key=lambda t: sum(times[n, m, t] for n in names))
        wide[tile] = fastest(("q/k/v",), "linear")
        tuning["linear", tile] = fastest(("o_proj", "down"), "linear")
        tuning["swiglu", tile] = fastest(("gate/up",), "swiglu")
    return tuning, wide


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


VARIANTS = {"bf16": ("fusedops bf16", {}),
            "bf16_prefetch": ("fusedops bf16, GEMV with its L2 prefetch before the wait", {}),
            "int4": ("fusedops int4", {"weights": "int4"}),
            "int4_lm_head": ("fusedops int4 + int4 lm_head", {"weights": "int4", "int4_lm_head": True}),
            "int4_swept": ("fusedops int4, GEMV tunings from this run's sweep", {"weights": "int4"}),
            "int4_combine": ("fusedops int4, attention splits merged by a second kernel", {"weights": "int4"}),
            "bf16_combine": ("fusedops bf16, attention splits merged by a second kernel", {}),
            "round_trip": ("fusedops bf16, weights = int4 round trip (lm_head bf16)", {})}
SHIPPED_TUNINGS = (dict(gemm_w4.TUNING), dict(gemm_w4.WIDE_LINEAR_TUNING))


def e2e(layers: int, steps: int, copy_gbs: float, preset: str = "llama3-8b",
        names: tuple[str, ...] = tuple(VARIANTS), swept: tuple[dict, dict] = SHIPPED_TUNINGS) -> list[dict]:
    """names: VARIANTS keys, bf16 first (the reference); round_trip (bf16 kernels on the int4 round-trip
    weights, compared with int4's logits: the int4 kernels' own error) last and after int4. swept: the
    (TUNING, WIDE_LINEAR_TUNING) int4_swept runs with (swept_tunings)."""
    from fusedops.perf.measure import (CachePool, StepClock, forward, greedy_steps, parity_logits, prefill_context,
                                        random_tokens)
    from fusedops.perf.models import cast_parameters, describe, preset_config, random_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the code
    model = random_model(preset_config(preset, layers), device)
    cast_parameters(model, torch.bfloat16)
    facts = describe(model)
    pool = CachePool()
    prompt = random_tokens((1, 16), model.config.vocab_size, device, 1)
    context = random_tokens((1, CONTEXT), model.config.vocab_size, device, 2)
    results, ref = [], {}
    variants = [VARIANTS[n] for n in names]
    for label, options in variants:
        torch._dynamo.reset()
        if label == VARIANTS["round_trip"][0]:  # same weights as "fusedops int4": the kernels' own error
            dequantize_linears(model)
            ref["logits"], ref["argmax"] = ref["int4"], ref["int4"][:-1].argmax(-1)
        gemv.PREFETCH = 1 if label == VARIANTS["bf16_prefetch"][0] else PREFETCH_SHIPPED  # captured per launch
        attention_decode.MERGE_IN_SPLIT_KERNEL = label not in (VARIANTS["int4_combine"][0], VARIANTS["bf16_combine"][0])
        gemm_w4.TUNING, gemm_w4.WIDE_LINEAR_TUNING = (dict(t) for t in (
            swept if label == VARIANTS["int4_swept"][0] else SHIPPED_TUNINGS))
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
            if label == VARIANTS["int4"][0]:
                ref["int4"] = logits
            rel = ((logits.double() - ref["logits"].double()).norm() / ref["logits"].double().norm()).item()
            agree = (logits[:-1].argmax(-1) == ref["argmax"]).double().mean().item()
            # decode speed: eager prefill of CONTEXT tokens, then graph-replayed steps
            cache = pool.get(model, 1, CACHE_LEN)
            ids, pos = prefill_context(model, context, cache)
            ids, pos = greedy_steps(fn, ids, cache, pos, 3)
            clock = StepClock(device)
            greedy_steps(fn, ids, cache, pos, steps, clock)
        step_ms = sum(clock.intervals_ms()) / steps
        results.append(dict(label=label, step_ms=step_ms, rel=rel, agree=agree, compile_s=compile_s,
                            weight_bytes=streamed_bytes(model, facts, options)))
        print(f"{label}: {step_ms:.3f} ms a step, logits rel err {rel:.3e}, agree {100 * agree:.1f} %, "
              f"compile + parity {compile_s:.1f} s", flush=True)
    gemm_w4.TUNING, gemm_w4.WIDE_LINEAR_TUNING = (dict(t) for t in SHIPPED_TUNINGS)
    attention_decode.MERGE_IN_SPLIT_KERNEL = True
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
    parser.add_argument("--variants", default=",".join(VARIANTS), help="e2e variants, comma-separated, bf16 first")
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    swept = SHIPPED_TUNINGS
    if args.part in ("kernels", "all"):
        rows, sweep, times = kernels(copy_gbs)
        swept = swept_tunings(times)
        print(f"swept tunings: {swept}", flush=True)
        table(sweep, "int4 GEMV tunings (kernel alone, graph replay)", "bench_w4_tunings.md")
        table(rows, f"int4 ops vs bf16 cuBLAS and the bf16 GEMV (graph replay, copy {copy_gbs:.0f} GB/s)",
              "bench_w4_kernels.md")
        table(prefill_route(), "int4 above the GEMV range: dequantize + cuBLAS", "bench_w4_prefill.md")
    if args.part in ("e2e", "all"):
        rows = e2e(args.layers, args.steps, copy_gbs, args.preset, tuple(args.variants.split(",")), swept)
        table(rows, f"{args.preset} shape decode, batch 1 (copy {copy_gbs:.0f} GB/s)", "bench_w4_e2e.md")


if __name__ == "__main__":
    main()
