"""fusedops.explain(model_or_fn, *args, **kwargs): what torch.compile(backend="fusedops") would do.

Runs the function once under Dynamo with a dry-run fusedops backend (rewrites reported, nothing
replaced, no CUDA graphs), prints one report per graph Dynamo hands over and returns them. Call it
the way the model will run (under torch.no_grad() for inference: with grad on and parameters that
require grad, nothing is fused).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backend import compile_graph, parse_options
from .backend.report import Report


@dataclass
class Explanation:
    reports: list[Report] = field(default_factory=list)
    output: object = None

    def __str__(self) -> str:
        if not self.reports:
            return "fusedops explain: Dynamo compiled no graph (nothing to rewrite)"
        parts = [f"fusedops explain: {len(self.reports)} graph(s)"]
        parts += [f"--- graph {i} ---\n{r.format()}" for i, r in enumerate(self.reports)]
        return "\n".join(parts)


def explain(model_or_fn, *args, verbose: bool = True, **kwargs) -> Explanation:
    """Compile model_or_fn with a dry-run fusedops backend, call it with *args/**kwargs, print and
    return the reports (one per graph)."""
    opts = parse_options(options={"dry_run": True, "cuda_graphs": False, "log": False})
    result = Explanation()

    def dry_run_backend(gm, example_inputs):
        fn, report = compile_graph(gm, example_inputs, opts)
        result.reports.append(report)
        return fn

    result.output = torch.compile(model_or_fn, backend=dry_run_backend)(*args, **kwargs)
    if verbose:
        print(result)
    return result
