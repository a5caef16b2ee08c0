"""Boolean masks for fusedops::attention from the float masks HF builds in the graph.

An additive float mask is exact as a boolean one (True = attend where the value is 0) when every
value is either 0 or so negative that exp() underflows to 0: we prove that from how the graph
builds it, never from runtime values —
  transformers 5.x eager:  where(bool_mask, 0, min)            -> bool_mask itself (no new kernel)
  transformers 4.4x:       full(min) *= (arange > pos) [triu] [masked_fill(bool, min)] -> mask == 0
                           (GPT-2: full(min).masked_fill_(causal, 0).to(float))
each optionally viewed ([None, None], expand, [..., :kv_len]). The `== 0` runs once per source
mask (before its first attention), the views are replayed on the boolean result per use.

mask_blocks gives each boolean mask its block map (fusedops::attention_mask_blocks), once per mask
node: HF builds one mask per forward and every layer's attention reads it.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch

from .base import Context
from .nodes import arg, dtype, float_const, is_cast, kind, val

# An additive mask value at or below this is "never attend" (exp underflows to 0 in fp32 softmax).
MASKED_BELOW = -1e4
_VIEW_KINDS = ("getitem", "expand", "view", "unsqueeze", "contiguous")
_INPLACE_OK = ("mul_", "masked_fill_", "triu_", "tril_")


def is_zero(node: Any) -> bool:
    """0, torch.zeros(()) (transformers 5.2x) or torch.tensor(0.0) (5.1x)."""
    if float_const(node) is not None:
        return float_const(node) == 0.0
    target = getattr(node, "target", None)
    if target in (torch.zeros, torch.zeros_like):
        return True
    return target in (torch.tensor, torch.scalar_tensor) and bool(node.args) and float_const(node.args[0]) == 0.0


def _zero_or_low(node: Any) -> bool:
    value = float_const(node)
    return is_zero(node) or (value is not None and value <= MASKED_BELOW)


def _is_view(node: Any) -> bool:
    return kind(node) in _VIEW_KINDS or getattr(node, "target", None) == "clone"


def _mutations_keep_binary(node) -> bool:
    """In-place users of node (4.4x: `causal_mask[..., :n] = masked_fill(...)`, `*=`) keep {0, low}."""
    for user in node.users:
        if user.target is operator.setitem and user.args[0] is node:
            if not (_zero_or_low(user.args[2]) or _binary(user.args[2])):
                return False
        elif isinstance(user.target, str) and user.target.endswith("_") and user.args and user.args[0] is node:
            if user.target not in _INPLACE_OK:
                return False
    return True


def _binary(node: Any, depth: int = 0) -> bool:
    """Every value of node is 0 or <= MASKED_BELOW, by construction."""
    if not isinstance(node, torch.fx.Node) or depth > 16 or not _mutations_keep_binary(node):
        return False
    target, args = node.target, node.args
    if _is_view(node) or (is_cast(node) and dtype(node).is_floating_point):
        return _binary(args[0], depth + 1)
    if target is torch.where:
        return len(args) == 3 and dtype(args[0]) == torch.bool and _zero_or_low(args[1]) and _zero_or_low(args[2])
    if target is torch.full:
        return _zero_or_low(arg(node, 1, "fill_value"))
    if target in (torch.zeros, torch.zeros_like):
        return True
    if kind(node) == "mul" or target in (operator.imul, "mul_"):
        a, b = args[0], args[1]
        return (dtype(b) == torch.bool and _binary(a, depth + 1)) or (dtype(a) == torch.bool and _binary(b, depth + 1))
    if target in (torch.triu, torch.tril, "triu", "tril", "triu_", "tril_"):
        return _binary(args[0], depth + 1)
    if target in (torch.masked_fill, "masked_fill", "masked_fill_"):
        return _binary(args[0], depth + 1) and _zero_or_low(arg(node, 2, "value"))
    return False


def bool_mask(ctx: Context, mask, use) -> Optional[Any]:
    """A boolean node equivalent to the additive float `mask` at attention node `use`, or None."""
    chain = []
    base = mask
    while _is_view(base):
        chain.append(base)
        base = base.args[0]
    if not _binary(mask):
        return None
    if base.target is torch.where and is_zero(base.args[1]):
        source = base.args[0]
    elif base in ctx.memo:
        source = ctx.memo[base]
    else:
        source = ctx.memo[base] = ctx.call(operator.eq, (base, 0), use)
    for view in reversed(chain):  # replay the views on the boolean mask, just before this use
        previous = view.args[0]
        with ctx.graph.inserting_before(use):
            source = ctx.graph.node_copy(view, lambda n, p=previous, s=source: s if n is p else n)
    return source


def _mutated(node, depth: int = 0) -> bool:
    """An in-place write to node or to a view of it (mask[..., :n].fill_(...)) anywhere in the graph."""
    for user in node.users:
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
        if user.args and user.args[0] is node and (user.target is operator.setitem or name.endswith("_")):
            return True
        if kind(user) in _VIEW_KINDS and user.args and user.args[0] is node and depth < 16 and _mutated(user, depth + 1):
            return True
    return False


def mask_blocks(ctx: Context, mask, use):
    """A fusedops::attention_mask_blocks node of the boolean `mask` node, shared by its later uses
    (a mask mutated in place gets a fresh one per use)."""
    key = ("mask_blocks", mask)
    if key in ctx.memo:
        return ctx.memo[key]
    fake = val(mask)
    like = torch.ops.fusedops.attention_mask_blocks(fake) if isinstance(fake, torch.Tensor) else None
    blocks = ctx.call(torch.ops.fusedops.attention_mask_blocks.default, (mask,), use, like=like)
    if not _mutated(mask):
        ctx.memo[key] = blocks
    return blocks
