"""Which fusion moves fusedops' logits error vs the fp32 model? Runs the perf suite's parity check
(prompt + teacher-forced greedy steps through a StaticCache) for eager bf16, Inductor, fusedops with
every fusion, and fusedops with one pattern switched off at a time (all its fusion names: rope and
rope_cache_write are alternatives of one pattern, so switching off one name alone changes nothing), on one
model, in one process.

    python3 perf/ablate_parity.py --preset llama3-8b --layers 32 --prompts 2
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from fusedops.backend import fusedops_backend
from fusedops.backend.patterns import ALL_FUSIONS, PATTERNS
from fusedops.perf import measure, models


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3-8b", choices=list(models.PRESETS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=2, help="errors are means over this many prompts")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    model = models.random_model(models.preset_config(args.preset, args.layers), device, args.seed)
    pool = measure.CachePool()
    workload = dataclasses.replace(measure.WORKLOADS["parity"], parity_prompts=args.prompts)
    refs = measure.references(model, pool, workload, args.seed)
    pool.clear()
    models.cast_parameters(model, torch.bfloat16)

    def parity(fn) -> tuple[float, float]:
        results = []
        with torch.no_grad():
            for ref in refs:
                logits, _ = measure.parity_logits(fn, model, pool, ref.prompt, ref.tokens)
                results.append(measure.compare(logits, ref))
        torch._dynamo.reset()
        return statistics.fmean(e for e, _ in results), statistics.fmean(a for _, a in results)

    rows = [("eager bf16", parity(model)), ("inductor", parity(torch.compile(model, dynamic=False)))]
    for off in [()] + [p.names for p in PATTERNS]:
        fusions = sorted(ALL_FUSIONS - set(off))
        fn = torch.compile(model, backend=fusedops_backend, dynamic=False,
                           options={"fusions": fusions})
        rows.append(("fusedops" + (f" without {' / '.join(off)}" if off else ""), parity(fn)))
    print(f"\n{args.preset}, {args.layers} layers, bf16 vs the fp32 model "
          f"(mean of {len(refs)} x {workload.parity_prompt}-token prompt + {workload.parity_steps} steps)")
    print("| run | logits rel err | greedy agreement |\n|---|---|---|")
    for name, (err, agree) in rows:
        print(f"| {name} | {err:.3e} | {agree:.0%} |")


if __name__ == "__main__":
    main()
