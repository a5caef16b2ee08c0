"""Replays the rewritten forward as CUDA graphs, one per input-shape signature.

A signature is the shapes of the inputs whose shapes are symbolic plus the values of int inputs (a
graph Dynamo compiled with static shapes has exactly one). Per signature: `warmup` eager calls (they
load kernels and let lazy state settle), then one capture, then replays. All captures share one
private memory pool per device.

Inputs fall in two classes, decided once per compiled graph:
  stable   parameters, buffers, tensors marked static (torch._dynamo.mark_static_address) and every
           input the graph mutates (StaticCache keys/values, cumulative_length): used in place, so the
           mutation lands in the caller's tensor; their data_ptrs are compared on each call and a
           change recaptures (never a replay on a stale address).
  dynamic  everything else (input_ids, cache_position, position_ids, ...): copied into static
           buffers with one _foreach_copy_ (no sync).
Outputs: cloned when options.clone_outputs (eager's semantics); otherwise the graph's own static
tensors, valid until the next call of any graph that shares the pool (Inductor reduce-overhead's
contract). An output that is one of the inputs is returned as the caller's tensor.
"""
from __future__ import annotations

import collections
import operator
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from .options import BackendOptions
from .patterns.nodes import is_view, written_nodes

# A signature whose stable inputs move this many times in a row before its graph was replayed twice
# is thrashing (a fresh buffer each call): it runs eagerly from then on.
MAX_THRASH = 3

_pools: dict[int, Any] = {}
# The C++ pointer check Inductor's cudagraph trees use (CUDA builds only): ≈ 10x cheaper per input
# than a Python loop over Tensor.data_ptr(), which matters with ~300 parameters per call.
_ptrs_equal_at = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
_data_ptr = torch.Tensor.data_ptr


def shared_pool(device_index: int):
    """The one private memory pool that every fusedops capture on this device allocates from.

    A pool id stays valid only while some graph captured into it is alive: once the last one dies
    (a compiled model dropped, torch._dynamo.reset()) while tensors it allocated are still held (the
    static outputs the caller kept), the allocator keeps the pool with a use count of 0 and the next
    capture into that id fails its INTERNAL ASSERT `use_count > 0`. The second compile of a model then
    ran without graphs, at eager speed (H200, 2026-12-03). A one-op sentinel graph captured into the
    pool and kept here for the life of the process holds the count at >= 1.
    """
    if device_index not in _pools:
        handle = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device_index):
            scratch = torch.zeros(1, device=f"cuda:{device_index}")
            sentinel = torch.cuda.CUDAGraph()
            with torch.cuda.graph(sentinel, pool=handle):
                scratch.add_(1)
        _pools[device_index] = (handle, sentinel, scratch)
    return _pools[device_index][0]


def mutated_placeholders(gm: torch.fx.GraphModule) -> set[int]:
    """Positions of the placeholders that an in-place op (x.op_(...), x[i] = v, out=, a schema's
    `Tensor(a!)` argument) may write, directly or through a chain of views."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    aliases: dict[torch.fx.Node, set[int]] = {n: {i} for i, n in enumerate(placeholders)}
    mutated: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_method", "call_function") or not node.args:
            continue
        first = node.args[0]
        source = aliases.get(first, set()) if isinstance(first, torch.fx.Node) else set()
        if is_view(node) and source:
            aliases[node] = source
        for t in written_nodes(node):
            mutated |= aliases.get(t, set())
    return mutated


def _is_static_address(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None


def _symbolic_inputs(gm: torch.fx.GraphModule, example_inputs) -> list[int]:
    """Inputs whose value shapes the signature: int/SymInt inputs and tensors with symbolic dims."""
    keyed = []
    for i, (node, ex) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), example_inputs)):
        value = node.meta.get("example_value", ex)
        if isinstance(ex, (int, torch.SymInt)):
            keyed.append(i)
        elif isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            keyed.append(i)
    return keyed


def cuda_graph_blocker(example_inputs, needs_grad: bool) -> str | None:
    """Why this graph cannot be captured at all, or None."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if needs_grad:
        return "autograd is recording (grad mode on and an input requires grad)"
    devices = {t.device for t in tensors}
    if not tensors or any(d.type != "cuda" for d in devices):
        return f"inputs on {sorted(str(d) for d in devices) or 'no device'} (CUDA graphs need CUDA inputs)"
    if len(devices) > 1:
        return f"inputs on several devices {sorted(str(d) for d in devices)}"
    return None


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[torch.Tensor]      # buffers of the dynamic inputs, in dynamic order
    stable_ptrs: list[int]                 # in stable_idx order
    input_ptrs: list[int | None]           # per input position (None: copied input), for the C++ check
    outputs: Any                           # what fn returned during capture (static tensors)
    output_aliases: dict[int, int]         # output position -> input position it is
    replays: int = 0


@dataclass
class GraphRunner:
    """Callable that Dynamo invokes with the graph's flat inputs."""
    fn: Callable
    gm: torch.fx.GraphModule
    example_inputs: list
    options: BackendOptions
    name: str = "graph"
    log: Callable[[str], None] = field(default=lambda msg: print(f"[fusedops] {msg}", file=sys.stderr))

    def __post_init__(self):
        inputs = self.example_inputs
        mutated = mutated_placeholders(self.gm)
        self.placeholder_names = [n.name for n in self.gm.graph.find_nodes(op="placeholder")]
        self.stable_idx = [i for i, t in enumerate(inputs)
                           if isinstance(t, torch.Tensor) and (i in mutated or _is_static_address(t))]
        self.dynamic_idx = [i for i, t in enumerate(inputs)
                            if isinstance(t, torch.Tensor) and i not in set(self.stable_idx)]
        self.keyed_idx = _symbolic_inputs(self.gm, inputs)
        self.token_idx = self._token_input(inputs)
        self.device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
        self.graphs: collections.OrderedDict[Any, Captured] = collections.OrderedDict()
        self.calls: collections.Counter = collections.Counter()
        self.thrash: collections.Counter = collections.Counter()
        self.eager_only: dict[Any, str] = {}
        self._stable = operator.itemgetter(*self.stable_idx) if len(self.stable_idx) > 1 else None

    def _token_input(self, inputs) -> int | None:
        """The dynamic input that counts tokens: the first integer tensor (input_ids), else the first
        floating one (inputs_embeds, counted without its last dim)."""
        dynamic = [i for i in self.dynamic_idx if inputs[i].dim() >= 1]
        ints = [i for i in dynamic if not inputs[i].is_floating_point()]
        return (ints or dynamic or [None])[0]

    def tokens(self, args) -> int:
        if self.token_idx is None:
            return 1
        t = args[self.token_idx]
        return t.numel() if not t.is_floating_point() else t.numel() // max(1, t.shape[-1])

    def stable_ptrs(self, args) -> list[int]:
        if self._stable is not None:
            return list(map(_data_ptr, self._stable(args)))  # ≈ 20 % cheaper than a comprehension
        return [args[i].data_ptr() for i in self.stable_idx]

    def _stable_unchanged(self, args, cap: Captured) -> bool:
        if _ptrs_equal_at is not None:
            return _ptrs_equal_at(list(args), cap.input_ptrs, self.stable_idx)
        return self.stable_ptrs(args) == cap.stable_ptrs

    def signature(self, args):
        return tuple(tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else args[i]
                     for i in self.keyed_idx)

    def __call__(self, *args):
        key = self.signature(args) if self.keyed_idx else None
        cap = self.graphs.get(key)
        if cap is not None:
            if self._stable_unchanged(args, cap):
                return self._replay(key, cap, args)
            self._invalidate(key, cap, args)
        return self._run_or_capture(key, args)

    def _replay(self, key, cap: Captured, args):
        if self.keyed_idx:
            self.graphs.move_to_end(key)
        if cap.static_inputs:
            torch._foreach_copy_(cap.static_inputs, [args[i] for i in self.dynamic_idx])
        cap.graph.replay()
        cap.replays += 1
        return self._outputs(cap, args)

    def _outputs(self, cap: Captured, args):
        outs = cap.outputs
        if not cap.output_aliases and not self.options.clone_outputs:
            return outs
        single = not isinstance(outs, (tuple, list))
        items = [outs] if single else list(outs)
        for pos, src in cap.output_aliases.items():
            items[pos] = args[src]
        if self.options.clone_outputs:
            items = [o.clone() if isinstance(o, torch.Tensor) and i not in cap.output_aliases else o
                     for i, o in enumerate(items)]
        return items[0] if single else type(outs)(items) if isinstance(outs, tuple) else items

    def _invalidate(self, key, cap: Captured, args) -> None:
        moved = [self.placeholder_names[i] for i, new, old
                 in zip(self.stable_idx, self.stable_ptrs(args), cap.stable_ptrs) if new != old]
        self.thrash[key] = self.thrash[key] + 1 if cap.replays < 2 else 0
        del self.graphs[key]
        if self.options.log:
            self.log(f"{self.name}: recapture {self._describe(key, args)}: input {moved[0]} moved "
                     f"({len(moved)} moved)")
        if self.thrash[key] >= MAX_THRASH:
            self.eager_only[key] = f"stable input {moved[0]} changes address on every call"
            if self.options.log:
                self.log(f"{self.name}: {self._describe(key, args)} runs eagerly: {self.eager_only[key]}")

    def _describe(self, key, args) -> str:
        return f"tokens={self.tokens(args)}" + (f" shapes={key}" if key is not None else "")

    def _capturable(self, key, args) -> bool:
        if key in self.eager_only:
            return False
        buckets, tokens = self.options.buckets, self.tokens(args)
        allowed = tokens in buckets if buckets else tokens <= self.options.max_graph_tokens
        if not allowed:
            self.eager_only[key] = (f"{tokens} tokens not in buckets {list(buckets)}" if buckets else
                                    f"{tokens} tokens > max_graph_tokens {self.options.max_graph_tokens}")
            if self.options.log:
                self.log(f"{self.name}: no graph for {self._describe(key, args)}: {self.eager_only[key]}")
        return allowed

    def _run_or_capture(self, key, args):
        if not self._capturable(key, args) or self.calls[key] < self.options.warmup:
            self.calls[key] += 1
            return self.fn(*args)
        start = time.perf_counter()
        try:
            cap = self._capture(args)
        except RuntimeError as exc:
            self.eager_only[key] = f"capture failed: {str(exc).splitlines()[0]}"
            if self.options.log:
                self.log(f"{self.name}: {self._describe(key, args)} runs eagerly: {self.eager_only[key]}")
            return self.fn(*args)
        self.graphs[key] = cap
        if len(self.graphs) > self.options.max_graphs:
            old_key, _ = self.graphs.popitem(last=False)
            if self.options.log:
                self.log(f"{self.name}: evicted the graph for shapes={old_key} (max_graphs "
                         f"{self.options.max_graphs})")
        if self.options.log:
            self.log(f"{self.name}: captured {self._describe(key, args)} in "
                     f"{(time.perf_counter() - start) * 1e3:.1f} ms ({len(self.graphs)} held)")
        return self._replay(key, cap, args)

    def _capture(self, args) -> Captured:
        static_inputs = [args[i].clone(memory_format=torch.preserve_format) for i in self.dynamic_idx]
        call_args = list(args)
        for i, buf in zip(self.dynamic_idx, static_inputs):
            call_args[i] = buf
        graph, outputs = self._record(call_args)
        items = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        by_id = {id(a): i for i, a in enumerate(call_args) if isinstance(a, torch.Tensor)}
        aliases = {pos: by_id[id(o)] for pos, o in enumerate(items) if id(o) in by_id}
        stable_ptrs = self.stable_ptrs(args)
        input_ptrs: list[int | None] = [None] * len(args)
        for i, ptr in zip(self.stable_idx, stable_ptrs):
            input_ptrs[i] = ptr
        return Captured(graph, static_inputs, stable_ptrs, input_ptrs, outputs, aliases)

    def _record(self, call_args):
        """Capture fn(*call_args) (nothing executes) into a graph; returns (graph, static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            with torch.cuda.graph(graph, pool=shared_pool(self.device.index)):
                outputs = self.fn(*call_args)
        return graph, outputs
