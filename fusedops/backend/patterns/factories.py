"""Identical tensor factories computed once. HF's StaticCache builds `torch.arange(q_len)` in every
layer to place that layer's writes; each is a kernel in a decode step's graph (32 of them for Llama-3-8B)
and all hold the same values. Later copies are replaced by the first when every user of each is an
out-of-place arithmetic op, so that no one can write to the shared tensor."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, Node

from .nodes import kind

SHARED_FACTORIES = (torch.arange,)
_COMPARISONS = (operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.sub, torch.sub)


def _only_read(node: Node) -> bool:
    """Every user computes a new tensor from node (no in-place op, no view that could be written)."""
    return all((kind(u) in ("add", "mul", "div", "neg") or (u.op == "call_function" and u.target in _COMPARISONS))
               and node not in u.kwargs.values()          # torch.add(a, b, out=node) writes it
               for u in node.users)


def _typed(value: Any) -> Any:
    """A value with its type, so that arange(4) and arange(4.0) (int64 vs float32) stay apart."""
    return (type(value), value)


def _key(node: Node) -> Any:
    try:
        key = (node.target, tuple(_typed(a) for a in node.args),
               tuple(sorted((k, _typed(v)) for k, v in node.kwargs.items())))
        hash(key)
    except TypeError:  # an unhashable argument (a list): leave the node alone
        return None
    return key


def share_identical_factories(graph: Graph) -> int:
    """Replace every repeated factory call by its first occurrence; returns how many were replaced."""
    first: dict[Any, Node] = {}
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SHARED_FACTORIES:
            continue
        if any(isinstance(a, Node) for a in node.args) or any(isinstance(v, Node) for v in node.kwargs.values()):
            continue  # a symbolic length: equal only if the graph says so, which this does not check
        key = _key(node)
        if key is None or not _only_read(node):
            continue
        kept = first.setdefault(key, node)
        if kept is not node:
            node.replace_all_uses_with(kept)
            graph.erase_node(node)
            replaced += 1
    return replaced
