"""MATCH + REWRITE: turn the FX graph Dynamo hands the backend into one that calls fusedops ops.

    result = rewrite_graph(gm, example_inputs, RewriteOptions())
    result.gm                 # runnable eagerly (and capturable by the run stage)
    result.report             # matches per pattern, replacements, near-misses, fallbacks, time
    result.prepared_weights   # the weights built (stacked qkv, gate/up), each with its extra memory

Everything unmatched stays as Dynamo traced it (StaticCache index_copy_ mutations included), except
that identical torch.arange calls are computed once (patterns/factories.py). Any error inside a
pattern falls back to the unmodified graph, with the reason in the report. See
docs/backend_design.md for the choices made here.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import torch
from torch.fx import Graph, GraphModule

from .patterns import ALL_FUSIONS, PATTERNS, Context, op_counts
from .patterns.factories import share_identical_factories
from .report import Report
from .weights import MODES, PreparedWeight


@dataclasses.dataclass(frozen=True)
class RewriteOptions:
    fusions: frozenset = ALL_FUSIONS   # names from ALL_FUSIONS; the others are left as traced
    dry_run: bool = False              # report what would be rewritten, return gm unchanged
    weight_mode: str = "alias"         # "alias": memory-neutral re-pointing, "copy": new tensors (weights.py)
    gate_up_block: Optional[int] = None  # prepare_gate_up's block; None = the GEMM dispatcher's (mlp.py)
    plain_gate_up: bool = False        # block = I ([Wg; Wu] aliased, 0 B extra) when no GEMM will read the
                                       # interleaved copy (weights="int4" re-packs gate/up anyway)

    def __post_init__(self):
        object.__setattr__(self, "fusions", frozenset(self.fusions))
        unknown = self.fusions - ALL_FUSIONS
        if unknown:
            raise ValueError(f"fusions: unknown {sorted(unknown)}; known: {sorted(ALL_FUSIONS)}")
        if self.weight_mode not in MODES:
            raise ValueError(f"weight_mode: {self.weight_mode!r} is not one of {MODES}")
        if self.gate_up_block is not None and self.gate_up_block <= 0:
            raise ValueError(f"gate_up_block: must be > 0, got {self.gate_up_block}")


@dataclasses.dataclass
class RewriteResult:
    gm: GraphModule
    report: Report
    prepared_weights: list[PreparedWeight]


def _needs_autograd(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _copy_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of the graph (same attributes), so a failed or dry rewrite
    leaves the caller's module untouched."""
    graph = Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return GraphModule(gm, graph)


def rewrite_graph(gm: GraphModule, example_inputs: Sequence[Any],
                  options: Optional[RewriteOptions] = None) -> RewriteResult:
    options = options or RewriteOptions()
    start = time.perf_counter()
    report = Report(dry_run=options.dry_run)
    report.ops_before = op_counts(gm)
    result = RewriteResult(gm, report, [])
    report.ops_after = report.ops_before
    if _needs_autograd(example_inputs):
        report.fallback("grad mode is on and inputs require grad: fused ops have no backward; "
                        "graph left as traced (run under torch.no_grad() / inference_mode)")
    else:
        work = _copy_module(gm)
        ctx = Context(work, example_inputs, options, report)
        try:
            for pattern in PATTERNS:
                if any(ctx.enabled(name) for name in pattern.names):
                    pattern.apply(ctx)
                    ctx.erase_dead()  # later patterns must not see the nodes this one consumed
            shared = share_identical_factories(work.graph)
            if shared:
                report.notes.append(f"{shared} repeated torch.arange call(s) computed once (one kernel each fewer)")
            work.graph.lint()
            work.recompile()
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            report.fallback(f"rewrite failed ({type(exc).__name__}: {exc}); graph left as traced")
        else:
            result.prepared_weights = ctx.prepared
            report.weights = [w.describe() for w in ctx.prepared]
            report.extra_weight_bytes = sum(w.extra_bytes for w in ctx.prepared)
            report.ops_after = op_counts(work)  # in a dry run: what the rewrite would give
            if not options.dry_run:
                result.gm = work
    report.seconds = time.perf_counter() - start
    report.emit()
    return result
