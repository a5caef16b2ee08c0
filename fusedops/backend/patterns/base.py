"""What every pattern gets: the graph, the example inputs behind its placeholders, the weight store
and the report; and the few graph edits patterns make (insert a fused call, redirect uses)."""
from __future__ import annotations

import collections
import operator
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch.fx import GraphModule, Node

from ..report import Report
from ..weights import PreparedWeight
from .nodes import is_pure, kind


class Context:
    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], options, report: Report):
        self.gm, self.graph, self.options, self.report = gm, gm.graph, options, report
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = dict(zip(placeholders, example_inputs))
        self.prepared: list[PreparedWeight] = []
        self.consumed: list[Node] = []
        self.memo: dict = {}  # per-graph results patterns share (e.g. one boolean mask per float mask)
        self._attr_count = collections.Counter()

    def order(self, node: Node) -> int:
        """Position of node in the graph (recomputed: the graph changes under the patterns)."""
        for i, n in enumerate(self.graph.nodes):
            if n is node:
                return i
        raise KeyError(f"node {node} is not in the graph")

    def enabled(self, name: str) -> bool:
        return name in self.options.fusions

    def tensor(self, node: Any) -> Optional[torch.Tensor]:
        """The real tensor behind a placeholder (a parameter Dynamo lifted to an input)."""
        t = self.inputs.get(node) if isinstance(node, Node) else None
        return t if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor) else None

    def call(self, target: Callable, args: tuple, before: Node, like: Any = None) -> Node:
        with self.graph.inserting_before(before):
            new = self.graph.call_function(target, args)
        if like is not None:
            new.meta["example_value"] = like
        return new

    def getitem(self, node: Node, index: Any, like_node: Optional[Node] = None) -> Node:
        with self.graph.inserting_after(node):
            new = self.graph.call_function(operator.getitem, (node, index))
        if like_node is not None and "example_value" in like_node.meta:
            new.meta["example_value"] = like_node.meta["example_value"]
        return new

    def replace(self, old: Node, new: Node, consumed: Sequence[Node]) -> None:
        """Send old's users to new; remember the matched nodes so the dead ones are erased at the end."""
        old.replace_all_uses_with(new, propagate_meta=False)
        self.consumed.extend(consumed)
        self.consumed.append(old)

    def prepared_weight(self, kind_name: str, build: Callable[[], tuple[torch.Tensor, PreparedWeight]],
                        shape: tuple, dtype: torch.dtype, before: Node) -> Node:
        """A get_attr node for a prepared weight. In a dry run nothing is built: a meta tensor of the
        right shape stands in, so the report tells what would be prepared."""
        if self.options.dry_run:
            tensor = torch.empty(shape, dtype=dtype, device="meta")
            self.prepared.append(PreparedWeight(kind_name, tuple(shape), dtype, 0, False, False))
        else:
            tensor, info = build()
            self.prepared.append(info)
        self._attr_count[kind_name] += 1
        name = f"fusedops_{kind_name}_{self._attr_count[kind_name] - 1}"
        self.gm.register_buffer(name, tensor, persistent=False)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["example_value"] = tensor
        return node

    def erase_dead(self) -> None:
        """Erase matched nodes nobody uses any more, then the pure nodes that only fed them (their
        float masks, repeat_kv views, ...). In-place ops and the graph's own mutations stay."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        pending = sorted({n for n in self.consumed if n in order}, key=order.get, reverse=True)
        erased = set()
        while pending:
            node = pending.pop(0)
            if node in erased or node.users:
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            erased.add(node)
            pending += [n for n in inputs if not n.users and is_pure(n) and n not in erased]
        self.consumed = [n for n in self.consumed if n not in erased and n.users]


def op_counts(gm: GraphModule) -> collections.Counter:
    """Calls per operation: canonical kinds for torch ops, 'fusedops.<op>' for ours."""
    counts = collections.Counter()
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fusedops":
            counts[f"fusedops.{n.target._opname}"] += 1
        else:
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            counts[kind(n) or name] += 1
    return counts


class Pattern(Protocol):
    """One fusion: `apply` finds every match in ctx.graph, rewrites it (counting it in ctx.report)
    and records each near-miss with its reason. `names` are the fusions it can produce."""
    names: tuple[str, ...]

    def apply(self, ctx: Context) -> None: ...
