"""Run-stage numbers (H100): parity of torch.compile(backend="fusedops") on a small Llama (fp32 logits vs
eager, greedy tokens through generate + CompileConfig, bf16 vs an fp32 reference), then decode step
time of a Llama-3-8B-shape model (--layers of its 32, bf16, StaticCache 1024, context 512) for eager,
fusedops without CUDA graphs, fusedops mode="reduce-overhead" and Inductor mode="reduce-overhead";
host (CPU) microseconds per call of the whole compiled step, of the fusedops graph wrapper and of a
bare CUDAGraph.replay(); first-call (compile) time.

    python perf/bench_run_stage.py [--layers 4] [--batches 1 8] [--no-inductor]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fusedops.backend import fusedops_backend  # noqa: E402
from fusedops.backend.cudagraphs import GraphRunner  # noqa: E402
from perf.common import table  # noqa: E402

CONTEXT, CACHE_LEN = 512, 1024


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def spy(runners):
    """fusedops_backend, keeping each runner and the last arguments Dynamo gave it (≈ 0.2 µs extra)."""
    def backend(gm, example_inputs, mode=None, options=None):
        fn = fusedops_backend(gm, example_inputs, mode=mode, options=options)
        runners.append(fn)
        if not isinstance(fn, GraphRunner):
            return fn

        def call(*args):
            fn.last_args = args
            return fn(*args)
        return call
    return backend


def small_llama(dtype):
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", dtype).eval(), cfg


def parity() -> list[dict]:
    rows = []
    model, cfg = small_llama(torch.float32)
    ids = torch.randint(3, 1000, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        for mode in ("reduce-overhead", None):
            torch._dynamo.reset()
            fused = torch.compile(model, backend="fusedops", mode=mode)
            got = [fused(ids).logits.clone() for _ in range(3)][-1]   # eager warm-up, capture, replay
            rows.append({"check": f"fp32 prefill logits vs eager, mode={mode}", "value": f"{rel(got, reference):.2e}"})
    kwargs = dict(max_new_tokens=64, do_sample=False, cache_implementation="static", min_new_tokens=64)
    # HF compiles a StaticCache decode with Inductor on CUDA unless told not to: eager = disable_compile
    reference_tokens = model.generate(ids[:1], disable_compile=True, **kwargs)
    compile_config = transformers.CompileConfig(backend="fusedops")
    torch._dynamo.reset()
    got = model.generate(ids[:1], compile_config=compile_config, **kwargs)
    rows.append({"check": "fp32 generate 64 tokens via CompileConfig: identical to eager",
                 "value": str(torch.equal(got, reference_tokens))})
    with torch.no_grad():
        model.to(torch.bfloat16)
        eager = model(ids).logits
        torch._dynamo.reset()
        fused = torch.compile(model, backend="fusedops", mode="reduce-overhead")
        got = [fused(ids).logits.clone() for _ in range(3)][-1]
    rows.append({"check": "bf16 prefill logits vs fp32 reference: eager", "value": f"{rel(eager, reference):.3e}"})
    rows.append({"check": "bf16 prefill logits vs fp32 reference: fusedops", "value": f"{rel(got, reference):.3e}"})
    new = slice(ids.shape[1], None)
    for name, config in (("eager", None), ("fusedops", compile_config)):
        torch._dynamo.reset()
        tokens = model.generate(ids[:1], compile_config=config, **kwargs) if config else \
            model.generate(ids[:1], disable_compile=True, **kwargs)
        agree = (tokens[0, new] == reference_tokens[0, new]).float().mean().item()
        rows.append({"check": f"bf16 greedy tokens agreeing with fp32 (64): {name}", "value": f"{agree:.3f}"})
    return rows


def big_llama(layers):
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, cfg


def host_us(fn, calls=50) -> float:
    """Median host time of one call started on an idle GPU queue (what the CPU spends per step)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def gpu_ms(fn, calls=30) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def decode_rows(model, cfg, batch, with_inductor) -> list[dict]:
    cache = transformers.StaticCache(config=cfg, max_cache_len=CACHE_LEN)
    ids = torch.randint(0, cfg.vocab_size, (batch, CONTEXT), device="cuda")
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(CONTEXT, device="cuda"), use_cache=True)
    token = ids[:, -1:].contiguous()
    pos = torch.tensor([CONTEXT], device="cuda")
    variants = [("eager", None, None), ("fusedops, no CUDA graphs", "fusedops", {"options": {"cuda_graphs": False}}),
                ("fusedops reduce-overhead", "fusedops", {"mode": "reduce-overhead"})]
    if with_inductor:
        variants.append(("Inductor reduce-overhead", "inductor", {"mode": "reduce-overhead"}))
    rows = []
    for name, backend, kwargs in variants:
        torch._dynamo.reset()
        runners = []
        if backend is None:
            fn = model
        else:
            fn = torch.compile(model, backend=spy(runners) if backend == "fusedops" else backend,
                               dynamic=False, **kwargs)
        step = lambda: fn(token, past_key_values=cache, cache_position=pos, use_cache=True)  # noqa: E731
        with torch.no_grad():
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            for _ in range(3):
                step()
            row = {"batch": batch, "variant": name, "step ms": gpu_ms(step), "host us/step": host_us(step),
                   "first call s": first_s}
            graphs = [r for r in runners if isinstance(r, GraphRunner) and r.graphs]
            if graphs:
                runner, cap = graphs[0], next(iter(graphs[0].graphs.values()))
                args = runner.last_args
                row["wrapper us"] = host_us(lambda: runner(*args), calls=100)
                row["bare replay us"] = host_us(cap.graph.replay, calls=100)
                row["inputs in place/copied"] = f"{len(runner.stable_idx)}/{len(runner.dynamic_idx)}"
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__}")
    if not args.skip_parity:
        table(parity(), "fusedops run stage: parity (small Llama, 4 layers, hidden 512)", "run_stage_parity.md")
    model, cfg = big_llama(args.layers)
    rows = []
    for batch in args.batches:
        rows += decode_rows(model, cfg, batch, not args.no_inductor)
    table(rows, f"decode step, Llama-3-8B shape, {args.layers} layers, bf16, StaticCache {CACHE_LEN}, "
                f"context {CONTEXT}", "run_stage_decode.md")


if __name__ == "__main__":
    main()
