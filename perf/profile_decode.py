"""Where a compiled decode step spends its GPU time: kernels of N graph-replayed batch-1 steps of a
Llama-3-8B-shape model (random weights, StaticCache, 512-token context), grouped by kernel name, per step.

    python3 perf/profile_decode.py [--layers 32] [--variants bf16,int4] [--steps 8]

Kernel times come from CUPTI through torch.profiler. With programmatic dependent launch consecutive kernels
overlap, so the column sum can exceed the step time; the step time printed beside it is the event-timed one.
"""
from __future__ import annotations

import argparse
import collections
import re

import torch

from common import table

VARIANTS = {"bf16": {}, "int4": {"weights": "int4"}, "int4_lm_head": {"weights": "int4", "int4_lm_head": True}}
CONTEXT, CACHE_LEN = 512, 1024


def short(name: str) -> str:
    """Kernel names without template noise: the extern "C" name or the first identifier."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"^void |\(.*", "", name)
    return name[:70]


def profile(variant: str, layers: int, steps: int) -> tuple[list[dict], float]:
    from fusedops.perf.measure import CachePool, StepClock, greedy_steps, prefill_context, random_tokens
    from fusedops.perf.models import cast_parameters, preset_config, random_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_model(preset_config("llama3-8b", layers), device)
    cast_parameters(model, torch.bfloat16)
    torch._dynamo.reset()
    fn = torch.compile(model, backend="fusedops", options={"clone_outputs": False, **VARIANTS[variant]})
    pool = CachePool()
    cache = pool.get(model, 1, CACHE_LEN)
    context = random_tokens((1, CONTEXT), model.config.vocab_size, device, 2)
    with torch.no_grad():
        ids, pos = prefill_context(model, context, cache)
        ids, pos = greedy_steps(fn, ids, cache, pos, 4)  # compile, capture, warm
        clock = StepClock(device)
        ids, pos = greedy_steps(fn, ids, cache, pos, steps, clock)
        step_ms = sum(clock.intervals_ms()) / steps
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            greedy_steps(fn, ids, cache, pos, steps)
            torch.cuda.synchronize()
    total, count = collections.defaultdict(float), collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            key = short(ev.name)
            if key.startswith("Memcpy") or key.startswith("Memset"):
                continue
            total[key] += ev.device_time_total
            count[key] += 1
    rows = [{"kernel": k, "per step": count[k] / steps, "µs each": total[k] / count[k],
             "µs a step": total[k] / steps, "% of step": 100 * total[k] / steps / 1e3 / step_ms}
            for k in sorted(total, key=total.get, reverse=True)]
    rows.append({"kernel": "sum of kernels", "per step": sum(count.values()) / steps, "µs each": "-",
                 "µs a step": sum(total.values()) / steps,
                 "% of step": 100 * sum(total.values()) / steps / 1e3 / step_ms})
    del fn, model, pool
    torch.cuda.empty_cache()
    return rows, step_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default="bf16,int4")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        rows, step_ms = profile(variant, args.layers, args.steps)
        table(rows, f"decode step kernels, {variant}, {args.layers} layers, batch 1 "
                    f"(event-timed step {step_ms:.3f} ms)", f"profile_decode_{variant}.md")


if __name__ == "__main__":
    main()
