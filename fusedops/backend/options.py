"""The `mode` and `options` that torch.compile hands a third-party backend, parsed into one frozen
BackendOptions. Every bad key or value raises ValueError naming it.

torch.compile refuses `mode` and `options` together, so each mode maps to option defaults and
`options` alone can say everything a mode says:

    mode=None / "default"        CUDA graphs on (CUDA only), outputs cloned: eager's semantics
    mode="reduce-overhead"       CUDA graphs on, outputs static (overwritten by the next call,
    mode="max-autotune"          like Inductor's reduce-overhead); HF generate's CompileConfig default
    mode="max-autotune-no-cudagraphs"   no CUDA graphs
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .patterns import ALL_FUSIONS

# Calls with more tokens run without a graph. Not 512: without a graph every fused op costs 50-200 µs of
# Python on the H100 host, and a 2048-token prefill of a Llama-3-8B-shape model (8 layers) ran at eager
# speed, 17.8 ms vs 4.6 ms at 512 tokens in a graph (H100, 2026-11-25, perf/RESULTS.md). Prefill graphs
# cost pool memory for their activations (~0.3 GB per 1k tokens for that model); set "max_graph_tokens"
# or "buckets" to change it.
MAX_GRAPH_TOKENS = 8192
# Each captured graph pins its static inputs and outputs; 8 covers decode batch sizes 1..128 in powers
# of two with room for a few prefill shapes.
MAX_GRAPHS = 8

MODES = {
    None: dict(cuda_graphs=True, clone_outputs=True),
    "default": dict(cuda_graphs=True, clone_outputs=True),
    "reduce-overhead": dict(cuda_graphs=True, clone_outputs=False),
    "max-autotune": dict(cuda_graphs=True, clone_outputs=False),
    "max-autotune-no-cudagraphs": dict(cuda_graphs=False, clone_outputs=True),
}
FALLBACKS = ("eager", "inductor")
WEIGHTS = ("model", "int4")  # "int4": fused projections on group-128 int4 weights (backend/int4.py)


@dataclass(frozen=True)
class BackendOptions:
    fusions: frozenset[str] | None = None  # None: every fusion the rewrite knows
    cuda_graphs: bool = True                # only honoured on CUDA; CPU never captures
    clone_outputs: bool = True              # False: outputs live until the next call (static buffers)
    buckets: tuple[int, ...] | None = None  # token counts that get a graph; None: any <= max_graph_tokens
    max_graph_tokens: int = MAX_GRAPH_TOKENS
    max_graphs: int = MAX_GRAPHS            # captured graphs kept per compiled graph (LRU beyond)
    warmup: int = 1                         # eager calls of a shape before it is captured
    fallback: str = "eager"                 # what runs the graph after the rewrite: "eager" | "inductor"
    dry_run: bool = False                   # report only: the graph runs unchanged
    log: bool = field(default_factory=lambda: os.environ.get("FUSEDOPS_LOG", "0") not in ("", "0"))
    weights: str = "model"                  # "model": the model's own dtype; "int4": W4A16 projections
    int4_lm_head: bool = False              # with weights="int4": lm_head on int4 too (backend/int4.py)


def _bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"options[{key!r}]: expected True or False, got {value!r}")
    return value


def _positive_int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"options[{key!r}]: expected an integer >= {minimum}, got {value!r}")
    return value


def _fusions(value) -> frozenset[str] | None:
    if value is None or value == "all":
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__") or not all(isinstance(v, str) for v in value):
        raise ValueError(f"options['fusions']: expected 'all' or a list of fusion names, got {value!r}")
    unknown = sorted(set(value) - ALL_FUSIONS)
    if unknown:
        raise ValueError(f"options['fusions']: unknown {unknown}; known: {sorted(ALL_FUSIONS)}")
    return frozenset(value)


def _buckets(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"options['buckets']: expected a list of token counts, got {value!r}")
    sizes = [_positive_int("buckets", v) for v in value]
    if not sizes:
        raise ValueError("options['buckets']: empty list (use cuda_graphs=False to capture nothing)")
    return tuple(sorted(set(sizes)))


def _fallback(value) -> str:
    if value not in FALLBACKS:
        raise ValueError(f"options['fallback']: expected one of {FALLBACKS}, got {value!r}")
    return value


def _weights(value) -> str:
    if value not in WEIGHTS:
        raise ValueError(f"options['weights']: expected one of {WEIGHTS}, got {value!r}")
    return value


PARSERS = {
    "fusions": _fusions,
    "cuda_graphs": lambda v: _bool("cuda_graphs", v),
    "clone_outputs": lambda v: _bool("clone_outputs", v),
    "buckets": _buckets,
    "max_graph_tokens": lambda v: _positive_int("max_graph_tokens", v),
    "max_graphs": lambda v: _positive_int("max_graphs", v),
    "warmup": lambda v: _positive_int("warmup", v),
    "fallback": _fallback,
    "dry_run": lambda v: _bool("dry_run", v),
    "log": lambda v: _bool("log", v),
    "weights": _weights,
    "int4_lm_head": lambda v: _bool("int4_lm_head", v),
}


def parse_options(mode: str | None = None, options: dict | None = None) -> BackendOptions:
    """BackendOptions from torch.compile's `mode` and `options` (either may be None)."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not supported (expected one of {[m for m in MODES if m]})")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"options: expected a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in PARSERS)
    if unknown:
        raise ValueError(f"options: unknown key {unknown[0]!r} (known: {sorted(PARSERS)})")
    values = dict(MODES[mode])
    values.update({key: PARSERS[key](value) for key, value in options.items()})
    if values.get("int4_lm_head") and values.get("weights") != "int4":
        raise ValueError("options['int4_lm_head']: needs options['weights'] = 'int4'")
    return BackendOptions(**values)
