"""The `fusedops` torch.compile backend: MATCH + REWRITE (rewrite.py) to fused ops, then RUN: the
rewritten graph runs eagerly or through Inductor (options["fallback"]) and, on CUDA, is replayed
as CUDA graphs (cudagraphs.py).

Registered through the `torch_dynamo_backends` entry point, so `torch.compile(m, backend="fusedops")`
needs no import of fusedops. torch.compile passes `mode` or `options` (never both); see options.py.
"""
from __future__ import annotations

import itertools
import sys
import time
from typing import Callable

import torch

from .cudagraphs import GraphRunner, cuda_graph_blocker
from .int4 import apply_int4
from .options import BackendOptions, parse_options
from .report import Report, log_enabled
from .rewrite import RewriteOptions, rewrite_graph

__all__ = ["BackendOptions", "compile_graph", "fusedops_backend", "parse_options"]

_graph_ids = itertools.count()


def _log(message: str) -> None:
    print(f"[fusedops] {message}", file=sys.stderr)


def _graph_name() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return f"graph {compile_id}" if compile_id is not None else f"graph #{next(_graph_ids)}"


def _needs_grad(example_inputs) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _run_rest(gm: torch.fx.GraphModule, example_inputs, fallback: str) -> Callable:
    """What runs the rewritten graph: its own forward (every unmatched op as PyTorch runs it), or
    Inductor compiling the unmatched ops around the fused ones (custom ops stay calls)."""
    if fallback == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    return gm.forward


def compile_graph(gm: torch.fx.GraphModule, example_inputs, opts: BackendOptions) -> tuple[Callable, Report]:
    """Rewrite one Dynamo graph and wrap it for running; returns (callable, report)."""
    start = time.perf_counter()
    name = _graph_name()
    # Inductor compiles the rewritten graph against the parameters Dynamo recorded: aliasing would move
    # q/k/v's storage under it (a new storage offset fails its guards), so that fallback copies instead.
    rewrite_opts = RewriteOptions(dry_run=opts.dry_run, plain_gate_up=opts.weights == "int4",
                                  weight_mode="copy" if opts.fallback == "inductor" else "alias",
                                  **({} if opts.fusions is None else {"fusions": opts.fusions}))
    result = rewrite_graph(gm, example_inputs, rewrite_opts)
    report = result.report
    if opts.weights == "int4":
        apply_int4(result.gm, example_inputs, report, opts.int4_lm_head)
    fn = _run_rest(result.gm, example_inputs, opts.fallback)
    if not opts.cuda_graphs:
        blocker = "off (options or mode)"
    elif opts.dry_run:
        blocker = "off for a dry run"
    else:
        blocker = cuda_graph_blocker(example_inputs, _needs_grad(example_inputs))
    if blocker is None:
        runner = GraphRunner(fn, result.gm, list(example_inputs), opts, name=name, log=_log)
        report.notes.append(f"CUDA graphs: on ({len(runner.dynamic_idx)} inputs copied per call, "
                            f"{len(runner.stable_idx)} used in place; "
                            + (f"buckets {list(opts.buckets)}" if opts.buckets else
                               f"shapes up to {opts.max_graph_tokens} tokens") + ")")
        fn = runner
    else:
        report.notes.append(f"CUDA graphs: {blocker}")
    report.notes.append(f"rest of the graph: {opts.fallback}")
    report.notes.append(f"{name} compiled in {(time.perf_counter() - start) * 1e3:.1f} ms")
    if opts.log and (log_enabled() or opts.dry_run):
        # rewrite_graph printed its part already; the int4 pass ran after it
        for line in ([f"replaced  {r}" for r in report.replacements if r.startswith("int4:")]
                     + [f"near-miss int4 at {m.node}: {m.reason}" for m in report.near_misses if m.pattern == "int4"]
                     + report.notes):
            _log(line)
    elif opts.log:
        print(report.format(), file=sys.stderr)
    return fn, report


def fusedops_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                     options: dict | None = None) -> Callable:
    """torch.compile backend entry point (`backend="fusedops"`)."""
    fn, _ = compile_graph(gm, example_inputs, parse_options(mode, options))
    return fn
