"""python -m fusedops.perf: end-to-end comparison of eager, Inductor (default and reduce-overhead),
Liger-Kernel and fusedops on a Llama-family model — parity vs fp32 first, then decode and prefill speed.

    python -m fusedops.perf                                   # tiny Llama, seconds (CPU: parity only)
    python -m fusedops.perf --preset llama3-8b --quick        # quick: 8 layers unless --layers
    python -m fusedops.perf --checkpoint DIR --backends eager inductor-ro fusedops-ro
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
QUICK_LAYERS = 8   # llama3-8b, 5 compiled variants x 4 shapes: 32 layers compile for ~10 min, 8 fit in 5
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv):
    from .backends import BACKENDS
    from .models import DEFAULT_PRESET, PRESETS
    p = argparse.ArgumentParser(prog="python -m fusedops.perf", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET)
    src.add_argument("--checkpoint", metavar="DIR", help="local HF dir with config.json and *.safetensors")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's; --quick: "
                                              f"at most {QUICK_LAYERS} for presets)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and steps (llama3-8b at 8 layers: 2–3 min on an H100; "
                        "the default full run took 124 s there)")
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS),
                   help="in this order (default: all but fusedops-inductor with --quick, all without; "
                        "eager and fusedops on CPU). eager always runs first: it is the parity yardstick")
    p.add_argument("--parity-only", action="store_true",
                   help="only the parity check vs fp32 (logits error, greedy agreement, cold compile): "
                        "for checking more model families and depths in little GPU time")
    p.add_argument("--parity-prompts", type=int, metavar="N",
                   help="parity prompts (errors averaged; default: the workload's, 4 with --parity-only)")
    p.add_argument("--budget-s", type=float, help="skip backends that would start after this many seconds "
                                                  "(the report is rewritten after each backend)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "perf" / "out", help="where the .md and .png go")
    return p.parse_args(argv)


def build(args, device, progress):
    from . import models
    if args.checkpoint:
        progress(f"loading {args.checkpoint} (fp32) onto {device}")
        model = models.checkpoint_model(args.checkpoint, device, args.layers)
        return model, Path(args.checkpoint).name
    layers = args.layers
    if args.quick and layers is None and args.preset != models.DEFAULT_PRESET:
        layers = min(QUICK_LAYERS, models.PRESETS[args.preset]["num_hidden_layers"])
        progress(f"--quick: {layers} of {models.PRESETS[args.preset]['num_hidden_layers']} layers "
                 f"(--layers to change)")
    config = models.preset_config(args.preset, layers)
    progress(f"building {args.preset} ({config.num_hidden_layers} layers) with seeded random fp32 weights "
             f"on {device}")
    return models.random_model(config, device, args.seed), args.preset


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def header(args, name, facts, device, ceil, workload_name, workload) -> dict:
    import transformers
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    layers = f"{facts['layers']} layer{'s' * (facts['layers'] != 1)}"
    info = {"model": f"{name}, {layers}, {_count(facts['params'])} params, {args.dtype}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": dev, "software": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "commit": commit, "command": "python -m fusedops.perf " + " ".join(sys.argv[1:]),
            "workload": workload_name,
            "parity": (f"{workload.parity_prompts} random {workload.parity_prompt}-token prompt(s) + "
                       f"{workload.parity_steps} teacher-forced greedy steps each; errors are means over "
                       "the prompts")}
    if ceil:
        info["ceilings (this run)"] = (f"copy {ceil['copy_gbs'] / 1e3:.2f} TB/s, bf16 GEMM 8192³ "
                                       f"{ceil['gemm_tflops']:.0f} TFLOP/s")
    return info


def write(results, info, speed_note, stem: Path) -> tuple[str, str | None]:
    from . import report
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = report.markdown(info, results, speed_note)
    Path(f"{stem}.md").write_text(text)
    return text, report.plot(results, info["model"], Path(f"{stem}.png"))


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import measure, models
    from .backends import BACKENDS, DEFAULT_BACKENDS
    progress = measure.Progress()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workload_name = ("cpu" if device.type == "cpu" else "parity" if args.parity_only
                     else "quick" if args.quick else "full")
    workload = measure.WORKLOADS[workload_name]
    if args.parity_prompts is not None:
        if args.parity_prompts < 1:
            raise SystemExit(f"--parity-prompts: must be >= 1, got {args.parity_prompts}")
        workload = dataclasses.replace(workload, parity_prompts=args.parity_prompts)
    names = args.backends or DEFAULT_BACKENDS[workload_name]
    names = ["eager"] + [n for n in names if n != "eager"]

    model, name = build(args, device, progress)
    facts = models.describe(model)
    ceil = measure.ceilings(device)
    if ceil:
        progress(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOP/s")
    pool = measure.CachePool()
    progress(f"fp32 reference: {workload.parity_prompts} x {workload.parity_prompt}-token prompt + "
             f"{workload.parity_steps} greedy steps")
    refs = measure.references(model, pool, workload, args.seed)
    pool.clear()
    models.cast_parameters(model, DTYPES[args.dtype])

    speed_note = ("--parity-only: no speed measured." if args.parity_only else None if device.type == "cuda" else
                  "No CUDA GPU here: parity was checked through the CPU reference path; speed numbers need a GPU.")
    info = header(args, name, facts, device, ceil, workload_name, workload)
    stem = args.out / f"e2e_{name}_{facts['layers']}L_{workload_name}"
    results, lost = [], None
    for n in names:
        if lost:
            results.append(measure.BackendResult(n, "skipped", lost))
        elif args.budget_s is not None and progress.elapsed() > args.budget_s:
            results.append(measure.BackendResult(n, "skipped", f"time budget of {args.budget_s:g} s spent"))
        else:
            gate = measure.parity_gate(results[0] if results else None)
            results.append(measure.run_backend(BACKENDS[n], model, pool, refs, workload, gate, facts, ceil,
                                               progress, args.seed,
                                               speed=device.type == "cuda" and not args.parity_only))
            fault = measure.cuda_context_lost(device) if results[-1].status == "error" else None
            lost = None if fault is None else f"CUDA context lost after {n}: {fault}"
        text, plotted = write(results, info, speed_note, stem)   # partial results survive a kill
    print("\n" + text)
    print(f"wrote {stem}.md" + (f" and {stem}.png" if plotted is None else f"; plot skipped: {plotted}"))
    return 0 if results[0].status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
