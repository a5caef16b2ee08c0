"""One backend through the suite: parity against the fp32 reference, decode and prefill timing, compile
time and peak memory. Every backend runs the same HF forward (StaticCache, logits of the last position
only, as generate does) on the same inputs and the same cache tensors."""
from __future__ import annotations

import functools
import gc
import inspect
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from .backends import BackendSpec, Runner
from .timing import copy_bandwidth_gbs, gemm_tflops, time_cuda

CACHE_LEN = 1024          # ANCHORS.md's decode setup: a 1024-position StaticCache ...
DECODE_CONTEXT = 512      # ... holding 512 context tokens
DECODE_WARMUP = 3         # Inductor reduce-overhead records its CUDA graph on the 2nd call
PARITY_MARGIN = 2.0       # FA2's rule: a fast path may err at most 2x the same-dtype PyTorch error
PARITY_FLOOR = 1e-4       # fp32 runs: eager *is* the reference, so the gate needs a floor


@dataclass
class Workload:
    prefill_lengths: list[int]
    decode_batches: list[int]
    decode_steps: int       # timed decode steps per batch size
    prefill_reps: int
    parity_prompt: int      # prompt tokens of the parity run (batch 1) ...
    parity_steps: int       # ... and greedy tokens generated after it
    parity_prompts: int = 1  # prompts (seeds seed, seed+1, ...): errors are averaged over them, because one
                             # prompt through a deep random-weight model swings a backend's error by ~1 %


# quick: the shapes ANCHORS.md measured (decode batch 1 and 8, prefill 2k) plus the parity prompt shape
WORKLOADS = {
    "quick": Workload([512, 2048], [1, 8], 48, 5, 512, 32),
    "full": Workload([512, 2048, 4096], [1, 8, 32], 128, 10, 512, 64, 2),
    "cpu": Workload([], [], 0, 0, 32, 8),
    "parity": Workload([], [], 0, 0, 512, 64, 4),
}


class Progress:
    """Timestamped progress lines, so long compiles and sweeps visibly move."""

    def __init__(self, stream=sys.stdout):
        self.start, self.stream = time.perf_counter(), stream

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", file=self.stream, flush=True)


@dataclass
class BackendResult:
    name: str
    status: str = "ok"              # ok | mismatch | error | skipped
    note: str = ""
    rel_err: float | None = None    # logits vs fp32 reference, relative norm (mean over the prompts)
    agreement: float | None = None  # greedy tokens equal to the fp32 reference's (mean over the prompts)
    rel_errs: list[float] = field(default_factory=list)   # per prompt
    cold_prefill_s: float | None = None
    cold_decode_s: float | None = None
    warm_decode_s: float | None = None
    peak_gib: float | None = None
    decode: list[dict] = field(default_factory=list)
    prefill: list[dict] = field(default_factory=list)


# ---- model calls ----------------------------------------------------------------------------------

class CachePool:
    """One StaticCache per (batch, length, dtype), shared by all backends: compiled graphs see the same
    static cache tensors, and nothing is reallocated between backends. Each use starts from reset()."""

    def __init__(self):
        self.caches = {}

    def get(self, model, batch: int, length: int):
        from transformers import StaticCache
        key = (batch, length, model.dtype)
        if key not in self.caches:
            cache = StaticCache(config=model.config, max_cache_len=length)
            # Allocate the cache tensors eagerly now, never inside a compiled region.
            device = next(model.parameters()).device
            ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
            with torch.no_grad():
                forward(model, ids, cache, torch.arange(1, device=device))
            self.caches[key] = cache
        self.caches[key].reset()
        return self.caches[key]

    def clear(self):
        self.caches.clear()


@functools.cache
def _call_convention() -> tuple[str, bool]:
    """(cache keyword, whether cache_position is passed): transformers 5.24 renamed past_key_values to
    cache (5.17, the GPU box's, still says past_key_values); 5.x takes positions from the cache, 4.4x
    still wants cache_position."""
    from transformers import LlamaForCausalLM
    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


def forward(fn, ids, cache, positions) -> torch.Tensor:
    """One HF step: logits of the last position, [batch, vocab]."""
    cache_kw, with_cache_position = _call_convention()
    kwargs = {cache_kw: cache, "position_ids": positions.unsqueeze(0)}
    if with_cache_position:
        kwargs["cache_position"] = positions
    return fn(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def random_tokens(shape, vocab: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=gen).to(device)


# ---- parity ---------------------------------------------------------------------------------------

@dataclass
class Reference:
    logits: torch.Tensor      # [parity_steps + 1, vocab] fp32 on CPU
    tokens: torch.Tensor      # [parity_steps] greedy tokens of the reference, fed to every backend
    prompt: torch.Tensor


def parity_logits(fn, model, pool, prompt, forced, cache_len=CACHE_LEN) -> tuple[torch.Tensor, list]:
    """Prompt, then one step per forced token; returns the logits of every step [steps+1, vocab]
    (teacher-forced, so every backend is judged on the same positions) and per-call seconds."""
    device = prompt.device
    cache = pool.get(model, 1, cache_len)
    n = prompt.shape[1]
    seconds, logits = [], []
    dt, out = _timed_call(lambda: forward(fn, prompt, cache, torch.arange(n, device=device)), device)
    seconds.append(dt)
    logits.append(out.float().cpu())
    for i, tok in enumerate(forced.tolist()):
        torch.compiler.cudagraph_mark_step_begin()
        ids = torch.full((1, 1), tok, dtype=torch.long, device=device)
        pos = torch.tensor([n + i], device=device)
        dt, out = _timed_call(lambda: forward(fn, ids, cache, pos), device)
        seconds.append(dt)
        logits.append(out.float().cpu())
    return torch.cat(logits), seconds


def reference(model, pool, workload: Workload, seed: int) -> Reference:
    """fp32 greedy run of the model (called before its weights are cast)."""
    device = next(model.parameters()).device
    prompt = random_tokens((1, workload.parity_prompt), model.config.vocab_size, device, seed)
    tokens, logits = [], []
    with torch.no_grad():
        cache = pool.get(model, 1, CACHE_LEN)
        out = forward(model, prompt, cache, torch.arange(prompt.shape[1], device=device))
        for i in range(workload.parity_steps):
            logits.append(out.float().cpu())
            tokens.append(int(out.argmax(-1)))
            ids = torch.full((1, 1), tokens[-1], dtype=torch.long, device=device)
            pos = torch.tensor([prompt.shape[1] + i], device=device)
            out = forward(model, ids, cache, pos)
        logits.append(out.float().cpu())
    return Reference(torch.cat(logits), torch.tensor(tokens, dtype=torch.long), prompt)


def references(model, pool, workload: Workload, seed: int) -> list[Reference]:
    """One fp32 reference run per parity prompt (prompt seeds seed, seed + 1, ...)."""
    return [reference(model, pool, workload, seed + i) for i in range(max(1, workload.parity_prompts))]


def compare(logits: torch.Tensor, ref: Reference) -> tuple[float, float]:
    """(relative norm error of all logits, fraction of greedy tokens equal to the reference's)."""
    if not torch.isfinite(logits).all():
        return float("inf"), 0.0
    r = ref.logits.double()
    err = ((logits.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
    agree = (logits.argmax(-1) == ref.logits.argmax(-1)).double().mean().item()
    return err, agree


def parity_gate(eager: BackendResult | None) -> float | None:
    """Largest error a backend may show and still get speed numbers: eager-bf16's own error x margin."""
    if eager is None or eager.status != "ok" or eager.rel_err is None:
        return None
    return max(PARITY_MARGIN * eager.rel_err, PARITY_FLOOR)


# ---- speed ----------------------------------------------------------------------------------------

def prefill_context(model, context: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager prefill of `context` [batch, n] into `cache`: the greedy next ids and the next position."""
    n = context.shape[1]
    ids = forward(model, context, cache, torch.arange(n, device=context.device)).argmax(-1, keepdim=True)
    return ids, torch.tensor([n], device=context.device)


def greedy_steps(fn, ids, cache, pos, steps: int, clock: "StepClock | None" = None):
    """`steps` greedy decode steps of fn from (ids, pos), each a new CUDA-graph step (clock ticked after each);
    returns the next (ids, pos)."""
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        ids, pos = forward(fn, ids, cache, pos).argmax(-1, keepdim=True), pos + 1
        if clock is not None:
            clock.tick()
    return ids, pos


def decode_speed(runner: Runner, model, pool, batch: int, steps: int, facts: dict, bandwidth_gbs: float,
                 seed: int) -> dict:
    """Greedy decode at `batch` sequences after a DECODE_CONTEXT-token eager prefill; per-step times
    from CUDA events between steps (so CPU-bound gaps count, as they do for a user). The row keeps
    the seconds of the first call too: a compile for each new batch size."""
    device = next(model.parameters()).device
    cache = pool.get(model, batch, CACHE_LEN)
    context = random_tokens((batch, DECODE_CONTEXT), model.config.vocab_size, device, seed + batch)
    ids, pos = prefill_context(runner.eager, context, cache)
    first_s = None
    for _ in range(DECODE_WARMUP):
        torch.compiler.cudagraph_mark_step_begin()
        dt, logits = _timed_call(lambda: forward(runner.fn, ids, cache, pos), device)
        first_s = dt if first_s is None else first_s
        ids, pos = logits.argmax(-1, keepdim=True), pos + 1
    clock = StepClock(device)
    greedy_steps(runner.fn, ids, cache, pos, steps, clock)
    step_ms = clock.intervals_ms()
    mean_ms = sum(step_ms) / steps
    context = DECODE_CONTEXT + DECODE_WARMUP + steps / 2
    elem = model.dtype.itemsize
    kv_bytes = 2 * facts["layers"] * batch * facts["kv_heads"] * context * facts["head_dim"] * elem
    roofline_ms = (facts["streamed_params"] * elem + kv_bytes) / (bandwidth_gbs * 1e9) * 1e3
    return dict(batch=batch, tok_s=batch * 1e3 / mean_ms, step_ms=mean_ms,
                p50_ms=statistics.median(step_ms), p99_ms=_percentile(step_ms, 0.99),
                roofline_pct=100.0 * roofline_ms / mean_ms, first_call_s=first_s)


def prefill_speed(runner: Runner, model, pool, tokens: int, reps: int, facts: dict,
                  gemm_tflops: float, seed: int) -> dict:
    """Batch-1 prefill of `tokens` tokens into a StaticCache: median of `reps` CUDA-event timings."""
    device = next(model.parameters()).device
    cache = pool.get(model, 1, max(CACHE_LEN, tokens))
    ids = random_tokens((1, tokens), model.config.vocab_size, device, seed + tokens)
    pos = torch.arange(tokens, device=device)

    def call():
        cache.reset()
        torch.compiler.cudagraph_mark_step_begin()
        return forward(runner.fn, ids, cache, pos)

    first_s, _ = _timed_call(call, device)
    if device.type == "cuda":
        us = time_cuda(call, warmup=1, reps=reps, flush=False)
    else:
        us = statistics.median(_timed_call(call, device)[0] for _ in range(reps)) * 1e6
    # causal attention counted as half of S^2 (QK^T and PV, 2 FLOPs per multiply-add)
    flops = (2 * facts["matmul_params"] * tokens
             + 2 * facts["layers"] * facts["q_heads"] * facts["head_dim"] * tokens * tokens)
    tflops = flops / us / 1e6
    return dict(tokens=tokens, tok_s=tokens / us * 1e6, ms=us / 1e3, tflops=tflops,
                gemm_peak_pct=100.0 * tflops / gemm_tflops, first_call_s=first_s)


class StepClock:
    """Marks between decode steps: CUDA events recorded on the stream (no sync, so the loop runs as a
    user's would), or wall time on CPU. Intervals include any idle GPU time the CPU causes."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []
        self.tick()

    def tick(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---- one backend, start to finish ---------------------------------------------------------------

def run_backend(spec: BackendSpec, model, pool: CachePool, refs: list[Reference], workload: Workload,
                gate: float | None, facts: dict, ceilings: dict, progress: Progress,
                seed: int, speed: bool = True) -> BackendResult:
    """Parity first; speed only for a backend whose logits are as close to fp32 as eager-bf16's
    (times margin). Any failure becomes this backend's error row, never the suite's crash."""
    result = BackendResult(spec.name)
    device = next(model.parameters()).device
    if spec.needs_cuda and device.type != "cuda":
        result.status, result.note = "skipped", "needs a CUDA GPU"
        return result
    _free_memory(device)
    stage = "setup"
    try:
        with torch.no_grad(), spec.make(model) as runner:
            stage = "parity"
            progress(f"{spec.name}: parity run ({len(refs)} x {workload.parity_prompt}-token prompt, "
                     f"{workload.parity_steps} greedy steps){' incl. compiles' if spec.compiled else ''}")
            agreements = []
            for i, ref in enumerate(refs):
                logits, seconds = parity_logits(runner.fn, model, pool, ref.prompt, ref.tokens)
                err, agree = compare(logits, ref)
                result.rel_errs.append(err)
                agreements.append(agree)
                if spec.compiled and i == 0:
                    result.cold_prefill_s = seconds[0]
                    result.cold_decode_s = seconds[1] if len(seconds) > 1 else None
            result.rel_err = statistics.fmean(result.rel_errs)
            result.agreement = statistics.fmean(agreements)
            limit = gate if spec.name != "eager" else float("inf")
            spread = (f" (prompts: {', '.join(f'{e:.3e}' for e in result.rel_errs)})"
                      if len(result.rel_errs) > 1 else "")
            progress(f"{spec.name}: logits rel err vs fp32 {result.rel_err:.3e}{spread}, greedy agreement "
                     f"{result.agreement:.0%}" + (f" (gate {limit:.3e})" if limit != float("inf") else ""))
            if limit is None or not result.rel_err <= limit:
                result.status = "mismatch"
                result.note = ("no eager baseline to gate against" if limit is None else
                               f"logits error {result.rel_err:.3e} > {PARITY_MARGIN}x eager's")
                return result
            if not speed:
                return result
            for batch in workload.decode_batches:
                stage = f"decode batch {batch}"
                progress(f"{spec.name}: {stage}, {workload.decode_steps} timed steps")
                result.decode.append(decode_speed(runner, model, pool, batch, workload.decode_steps,
                                                  facts, ceilings["copy_gbs"], seed))
            for tokens in workload.prefill_lengths:
                stage = f"prefill {tokens} tokens"
                progress(f"{spec.name}: {stage}")
                result.prefill.append(prefill_speed(runner, model, pool, tokens, workload.prefill_reps,
                                                    facts, ceilings["gemm_tflops"], seed))
            if device.type == "cuda":
                result.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if runner.recompile is not None:
                stage = "warm compile"
                progress(f"{spec.name}: {stage} (fresh Dynamo, on-disk caches kept), decode batch 1")
                torch._dynamo.reset()
                fresh = runner.recompile()
                cache = pool.get(model, 1, CACHE_LEN)
                ids = torch.zeros((1, 1), dtype=torch.long, device=device)
                pos = torch.tensor([0], device=device)
                torch.compiler.cudagraph_mark_step_begin()
                result.warm_decode_s, _ = _timed_call(lambda: forward(fresh, ids, cache, pos), device)
    except Exception as exc:  # noqa: BLE001 - a failing backend is reported as its row, the suite goes on
        result.status = "error"
        result.note = f"{stage}: {type(exc).__name__}: {_first_line(exc)}"
        progress(f"{spec.name}: ERROR in {result.note}")
    return result


def cuda_context_lost(device) -> str | None:
    """After a backend's error: a CUDA fault (illegal address, ...) poisons the context for everyone
    after it, so the suite stops measuring rather than blaming the next backend."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as exc:    # torch.AcceleratorError derives from RuntimeError
        return _first_line(exc)
    return None


def _first_line(exc: Exception, limit: int = 240) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ceilings(device) -> dict:
    """Copy bandwidth and bf16 GEMM rate measured now, in this process, for the roofline columns."""
    if device.type != "cuda":
        return {}
    return dict(copy_gbs=copy_bandwidth_gbs(), gemm_tflops=gemm_tflops())
