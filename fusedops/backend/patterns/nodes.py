"""Structural helpers over the FX graph Dynamo hands a backend (torch IR). Patterns ask "which
operation is this node" through `kind`, never through node names, so that `x.pow(2)`,
`torch.pow(x, 2)`, `operator.mul` and `torch.mul` all read the same."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

_FUNCTIONS = {
    operator.add: "add", torch.add: "add",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg",
    operator.getitem: "getitem",
    torch.rsqrt: "rsqrt", torch.pow: "pow", torch.mean: "mean", torch.cat: "cat", torch.concat: "cat",
    torch.matmul: "matmul", torch.where: "where",
    torch._C._nn.linear: "linear", F.linear: "linear",
    F.silu: "silu", torch.nn.functional.silu: "silu",
    F.softmax: "softmax", torch.softmax: "softmax",
    F.dropout: "dropout",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
}
_METHODS = {"add": "add", "mul": "mul", "div": "div", "neg": "neg", "__neg__": "neg", "rsqrt": "rsqrt",
            "pow": "pow", "mean": "mean", "to": "to", "float": "to", "half": "to", "bfloat16": "to",
            "type_as": "to", "softmax": "softmax", "transpose": "transpose", "view": "view",
            "reshape": "view", "expand": "expand", "unsqueeze": "unsqueeze", "contiguous": "contiguous",
            "index_copy_": "index_copy_", "matmul": "matmul"}


# tensor factories the mask and position code uses; with `kind` these make up the ops known to be pure
_PURE_FACTORIES = (torch.where, torch.full, torch.zeros, torch.tensor, torch.scalar_tensor, torch.arange,
                   operator.eq)


def is_pure(node: Node) -> bool:
    """No side effects: safe to erase once unused (in-place methods and index_copy_ are not)."""
    return (kind(node) not in (None, "index_copy_")) or (node.op == "call_function" and node.target in _PURE_FACTORIES)


def kind(node: Any) -> Optional[str]:
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any):
    """The fake tensor Dynamo recorded for this node (None for constants and unknown nodes)."""
    return node.meta.get("example_value") if isinstance(node, Node) else None


def dtype(node: Any) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> Optional[tuple]:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same(a: Any, b: Any) -> bool:
    """Guard-free equality for ints/SymInts and shape tuples."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b)
    return a == b


def is_cast(node: Any) -> bool:
    """A dtype conversion that keeps device and shape (x.to(dtype), x.float(), x.type_as(y))."""
    if kind(node) != "to":
        return False
    if node.target == "to" and any(isinstance(a, (torch.device, str)) for a in node.args[1:]):
        return False
    if node.target == "to" and "device" in node.kwargs:
        return False
    return same(shape(node), shape(node.args[0]))


def strip_casts(node: Any) -> Any:
    while is_cast(node):
        node = node.args[0]
    return node


def binary_operands(node: Node) -> Optional[tuple[Any, Any]]:
    """(a, b) for a plain a+b / a*b node (no alpha, no out)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    return node.args[0], node.args[1]


def other_operand(node: Node, one: Any) -> Any:
    a, b = node.args[0], node.args[1]
    return b if a is one else a


def only_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def float_const(x: Any) -> Optional[float]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def last_dim(dim: Any, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim in (-1, ndim - 1)


# Torch-IR nodes whose result may alias their first argument (views); an in-place op on such a
# result mutates the placeholder underneath.
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "select", "narrow", "expand",
    "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "T", "mT", "contiguous", "split",
    "chunk", "unbind", "as_strided", "detach", "diagonal", "movedim", "swapaxes", "unfold", "__getitem__",
    "data", "type_as", "to", "float", "half", "bfloat16", "view_as_real", "view_as_complex"})
VIEW_FUNCTIONS = frozenset({
    operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.select, torch.narrow,
    torch.unsqueeze, torch.squeeze, torch.flatten, torch.split, torch.chunk, torch.unbind,
    torch.as_strided, torch.detach, torch.diagonal, torch.movedim, torch.swapaxes, torch.t})


def target_name(node: Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def schema_written_args(node: Node) -> list:
    """Arguments an operator's schema marks as written (`Tensor(a!)`): custom ops such as
    fusedops::rope_cache_write and aten in-place/out overloads."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        schemas = [getattr(target, name)._schema for name in target.overloads()]
    elif isinstance(target, torch._ops.OpOverload):
        schemas = [target._schema]
    else:
        return []
    written = []
    for schema in schemas:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                written += value if isinstance(value, (tuple, list)) else [value]
    return written


def is_view(node: Node) -> bool:
    """node's result may alias its first argument."""
    return (node.op == "call_method" and node.target in VIEW_METHODS) or node.target in VIEW_FUNCTIONS


def written_nodes(node: Node) -> list:
    """The nodes node may write in place: its first argument for x.op_(...) and x[i] = v, out=, and the
    arguments a schema marks `Tensor(a!)`."""
    name = target_name(node)
    written = [node.args[0]] if node.args and ((name.endswith("_") and not name.endswith("__"))
                                               or node.target is operator.setitem) else []
    out = node.kwargs.get("out")
    written += list(out) if isinstance(out, (tuple, list)) else [out]
    return [t for t in written + schema_written_args(node) if isinstance(t, Node)]
