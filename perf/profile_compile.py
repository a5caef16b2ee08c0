"""Where fusedops' cold compile goes: cProfile over the first prefill call and the first decode call of a
preset model compiled as the perf suite compiles it (fusedops, mode="reduce-overhead", dynamic=False).

    python perf/profile_compile.py --preset llama3-8b --layers 32 [--prompt 512] [--top 30]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from fusedops.perf import measure, models


def profiled(label: str, fn, top: int) -> None:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    fn()
    torch.cuda.synchronize()
    prof.disable()
    print(f"\n## {label}: {time.perf_counter() - start:.2f} s (cProfile on: its overhead is included)")
    for key in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(top)
        body = text.getvalue()
        print(f"### sorted by {key}\n" + body[body.find("   ncalls"):])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3-8b", choices=list(models.PRESETS))
    p.add_argument("--layers", type=int)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    from fusedops.backend import fusedops_backend
    device = torch.device("cuda")
    model = models.random_model(models.preset_config(args.preset, args.layers), device, seed=0)
    models.cast_parameters(model, torch.bfloat16)
    pool = measure.CachePool()
    compiled = torch.compile(model, backend=fusedops_backend, dynamic=False, mode="reduce-overhead")
    prompt = measure.random_tokens((1, args.prompt), model.config.vocab_size, device, seed=0)
    cache = pool.get(model, 1, measure.CACHE_LEN)
    with torch.no_grad():
        profiled(f"first prefill call ({args.prompt} tokens)",
                 lambda: measure.forward(compiled, prompt, cache, torch.arange(args.prompt, device=device)),
                 args.top)
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        profiled("first decode call", lambda: measure.forward(compiled, ids, cache,
                                                              torch.tensor([args.prompt], device=device)),
                 args.top)


if __name__ == "__main__":
    main()
