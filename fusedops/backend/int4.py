"""options={"weights": "int4"}: after the rewrite, the fused projections run on int4 weights.

    fusedops::linear(x, W, None)          -> fusedops::linear_w4            (stacked q/k/v; o_proj and
                                                                             down_proj, whose residual
                                                                             add goes to add_rms_norm)
    fusedops::linear_residual(x, W, res)  -> fusedops::linear_residual_w4   (a projection + add no norm
                                                                             follows)
    fusedops::gate_up_silu(x, Wgu, block) -> fusedops::gate_up_silu_w4      ([Wg; Wu] re-packed plainly)
    the last plain projection              -> fusedops::linear_w4            (lm_head, "int4_lm_head": a
      (fusedops::linear marked PLAIN_LINEAR by the rewrite, or a torch linear)      bias-free one)

lm_head stays in the model dtype by default: its output is the logits themselves (GPTQ and AWQ leave it
unquantized for that reason), and it is 1 of 7 GEMMs a layer-stack reads, ~13 % of an int4 Llama-3-8B
step's bytes at bf16. Weights are quantized once per source tensor (keyed like weights.py: data_ptr,
_version, shape, dtype, device, group) in a process-wide store whose entries die with their source, so
every graph of a model (prefill, each decode size, recompiles) shares one int4 copy. The bf16 sources
are left as they are: the user's model still uses them; the rewritten graph no longer holds the bf16
tensors it swapped out. The int4 weights are a snapshot taken at compile time: new values written into
the model afterwards (load_state_dict, load_safetensors) reach the int4 graphs only after
`torch._dynamo.reset()` and a recompile (the bf16 path reads the parameters themselves).
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from .. import quant
from ..ops.gemm import split_gate_up
from .patterns import op_counts
from .patterns.linear import PLAIN_LINEAR, linear_parts
from .patterns.nodes import kind
from .report import Report

OPS = torch.ops.fusedops
GROUP = quant.GROUP


class QuantStore:
    """Process-wide int4 copies of weights, keyed per source tensor; an entry dies with its source."""

    def __init__(self) -> None:
        self._cache: dict[tuple, quant.QuantizedWeight] = {}

    def get(self, kind_name: str, source: torch.Tensor, group: int, build) -> tuple[quant.QuantizedWeight, bool]:
        key = (kind_name, group, source.data_ptr(), source._version, tuple(source.shape), source.dtype,
               source.device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit, True
        with torch.inference_mode(False), torch.no_grad():
            q = build()
        self._cache[key] = q
        weakref.finalize(source, self._cache.pop, key, None)
        return q, False

    def __len__(self) -> int:
        return len(self._cache)


STORE = QuantStore()


def _real_tensor(gm: GraphModule, inputs: dict, node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, Node):
        return None
    if node.op == "get_attr":
        t = getattr(gm, node.target, None)
    elif node.op == "placeholder":
        t = inputs.get(node)
    else:
        return None
    return t if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor) else None


class Int4Pass:
    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any], report: Report, lm_head: bool):
        self.gm, self.graph, self.report, self.lm_head = gm, gm.graph, report, lm_head
        self.inputs = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs))
        self.count = 0
        self.int4_bytes = 0

    def _problem(self, x: Node, weight: Optional[torch.Tensor]) -> Optional[str]:
        if weight is None or weight.dim() != 2:
            return "weight is not a 2-D tensor known at compile time"
        if weight.dtype not in quant.SUPPORTED_DTYPES:
            return f"weight dtype {weight.dtype} is not bf16/fp16"
        if weight.shape[1] % GROUP:
            return f"K = {weight.shape[1]} is not a multiple of the group size {GROUP}"
        value = x.meta.get("example_value") if isinstance(x, Node) else None
        if value is not None and value.dtype != weight.dtype:
            return f"input dtype {value.dtype} differs from the weight's {weight.dtype}"
        return None

    def _buffers(self, q: quant.QuantizedWeight, before: Node) -> tuple[Node, Node, Optional[Node]]:
        nodes = []
        for part in ("qweight", "scales", "zeros"):
            tensor = getattr(q, part)
            if tensor is None:
                nodes.append(None)
                continue
            name = f"fusedops_int4_{part}_{self.count}"
            self.gm.register_buffer(name, tensor, persistent=False)
            with self.graph.inserting_before(before):
                node = self.graph.get_attr(name)
            node.meta["example_value"] = tensor
            nodes.append(node)
        self.count += 1
        return tuple(nodes)

    def _swap(self, node: Node, op, x: Node, weight_node: Node, kind_name: str, build, extra_args=()) -> None:
        weight = _real_tensor(self.gm, self.inputs, weight_node)
        problem = self._problem(x, weight)
        if problem:
            self.report.near_miss("int4", node, problem)
            return
        q, cached = STORE.get(kind_name, weight, GROUP, lambda: build(weight))
        qw, scales, zeros = self._buffers(q, node)
        with self.graph.inserting_before(node):
            new = self.graph.call_function(op, (x, qw, scales, zeros, GROUP, *extra_args))
        if "example_value" in node.meta:
            new.meta["example_value"] = node.meta["example_value"]
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        if weight_node.op == "get_attr" and not weight_node.users:  # the bf16 prepared tensor: unpinned
            self.graph.erase_node(weight_node)
            delattr(self.gm, weight_node.target)
        self.int4_bytes += 0 if cached else q.nbytes()
        self.report.matched("int4", f"{node.name} ({kind_name} {list(weight.shape)}) -> {op._opname}"
                                    + (" (cached)" if cached else ""))

    def run(self) -> None:
        plain = [n for n in self.graph.nodes if n.op == "call_function" and (
            kind(n) == "linear" or (n.target is OPS.linear.default and n.meta.get(PLAIN_LINEAR)))]
        lm_head = plain[-1] if plain else None   # the graph's last plain projection
        for node in list(self.graph.nodes):
            if node.op != "call_function" or kind(node) == "linear" and node is not lm_head:
                continue   # an F.linear no fusion took (fusions subset): left as traced
            if node is lm_head:
                if not self.lm_head:
                    continue
                x, w, bias = node.args[:3] if node.target is OPS.linear.default else linear_parts(node)
                if bias is None:
                    self._swap(node, OPS.linear_w4.default, x, w, "lm_head", quant.quantize)
                else:
                    self.report.near_miss("int4", node, "lm_head has a bias")
            elif node.target is OPS.linear.default:
                x, w = node.args[:2]
                if len(node.args) < 3 or node.args[2] is None:
                    self._swap(node, OPS.linear_w4.default, x, w, "linear", quant.quantize)
                else:   # Qwen2's q/k/v: left in the model dtype, said so
                    self.report.near_miss("int4", node, "the projection has a bias (linear_w4 takes none)")
            elif node.target is OPS.linear_residual.default:
                x, w, residual = node.args
                self._swap(node, OPS.linear_residual_w4.default, x, w, "linear_residual", quant.quantize,
                           (residual,))
            elif node.target is OPS.gate_up_silu.default:
                x, w, block = node.args
                self._swap(node, OPS.gate_up_silu_w4.default, x, w, "gate_up",
                           lambda t, b=block: quant.quantize(torch.cat(split_gate_up(t, b), 0)))
        self.graph.lint()
        self.gm.recompile()


def apply_int4(gm: GraphModule, example_inputs: Sequence[Any], report: Report, lm_head: bool) -> None:
    """Swap the fused projections of an already rewritten graph (in place) for their int4 ops."""
    if report.fallbacks:
        report.notes.append("int4: skipped (the rewrite fell back; the graph is as traced)")
        return
    if report.dry_run:
        report.notes.append("int4: dry run, nothing quantized")
        return
    p = Int4Pass(gm, example_inputs, report, lm_head)
    p.run()
    report.ops_after = op_counts(gm)
    report.notes.append(f"int4: {report.matches['int4']} projections on int4 weights (group {GROUP}, "
                        f"+{p.int4_bytes / 2**20:.1f} MiB quantized now); lm_head "
                        + ("int4" if lm_head else "kept in the model dtype"))
