"""Diagnostic: the second fusedops compile of one model in a process (perf suite: fusedops then
fusedops-ro; bench_w4: bf16 then int4) measured at eager speed on the H100. Prints step times and the
backend's log (recaptures, eager fallbacks) and Dynamo's recompiles for both compiles."""
import sys
import time

import torch

from fusedops.perf import measure, models

torch._logging.set_logs(recompiles=True, graph_breaks=True)
device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")   # "cpu": a smoke run of the script
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
model = models.random_model(models.preset_config("tiny"), device, seed=0)
models.cast_parameters(model, torch.bfloat16)
pool = measure.CachePool()
prompt = measure.random_tokens((1, 32), model.config.vocab_size, device, seed=0)
RUNS = (("eager", None), ("first (default mode)", {}), ("second (reduce-overhead)", {"mode": "reduce-overhead"}),
        ("third (default mode)", {}), ("fourth (no CUDA graphs)", {"options": {"cuda_graphs": False}}))
for tag, kwargs in RUNS:
    torch._dynamo.reset()
    fn = model if kwargs is None else torch.compile(model, backend="fusedops", dynamic=False, **kwargs)
    cache = pool.get(model, 1, 128)
    with torch.no_grad():
        out = measure.forward(fn, prompt, cache, torch.arange(32, device=device))
        times = []
        for i in range(12):
            ids = out[:, -1:].argmax(-1) if out.dim() == 3 else out.argmax(-1, keepdim=True)
            sync()
            t0 = time.perf_counter()
            out = measure.forward(fn, ids.view(1, 1), cache, torch.tensor([32 + i], device=device))
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    print(f"== {tag}: decode step ms", " ".join(f"{t:.2f}" for t in times), flush=True)
    stats = torch._dynamo.utils.counters
    print(f"== {tag}: dynamo stats {dict(stats['stats'])}, graph breaks {dict(stats['graph_break'])}", flush=True)
    stats.clear()
