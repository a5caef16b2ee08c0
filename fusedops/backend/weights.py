"""One-time weight preparation for the rewritten graph: the stacked [Wq; Wk; Wv] (and its bias) and
the gate/up weight in fusedops.ops.gemm.prepare_gate_up's block layout.

Prepared tensors are cached per source parameter (data_ptr, _version, shape, dtype), so the
prefill graph, each decode graph and every recompile share one copy.

Memory: with mode "alias" (default) the source parameters are re-pointed (`param.data = view`) at
their rows of the prepared tensor, so the old storage is released and the net cost is zero; the
model keeps working (same values, same shapes and strides; only data_ptr moves) and later
`param.copy_()` writes land in the prepared tensor too. Aliasing is skipped, and a copy is made
and reported, where it is not safe: a gate/up block smaller than the intermediate size (the rows
are then not one contiguous range each), parameters that are not contiguous, require grad while
grad mode is on, or already share storage with other tensors the store did not make.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Sequence

import torch

from ..ops.gemm import prepare_gate_up

MODES = ("alias", "copy")


@dataclasses.dataclass
class PreparedWeight:
    kind: str                 # "qkv", "qkv_bias" or "gate_up"
    shape: tuple
    dtype: torch.dtype
    extra_bytes: int          # memory added by this preparation (0 when aliased or cached)
    aliased: bool
    cached: bool              # served from the store without any new work

    def describe(self) -> str:
        how = "cached" if self.cached else "aliased (params re-pointed, 0 B extra)" if self.aliased \
            else f"copied (+{self.extra_bytes / 2**20:.2f} MiB)"
        return f"{self.kind} {list(self.shape)} {str(self.dtype).replace('torch.', '')}: {how}"


def _key(kind: str, sources: Sequence[torch.Tensor], block: int) -> tuple:
    return (kind, block) + tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                                 for t in sources)


def _rows_adjacent(sources: Sequence[torch.Tensor]) -> bool:
    """True when the 2-D/1-D sources already lie back to back in one storage (an earlier alias)."""
    first = sources[0]
    offset = first.storage_offset()
    for t in sources:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return False
        offset += t.numel()
    return True


def _view_rows(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    rows = sum(t.shape[0] for t in sources)
    first = sources[0]
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                   (rows, *first.shape[1:]), first.stride())


class WeightStore:
    """Process-wide cache of prepared weights; entries die with their source parameters."""

    def __init__(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def _remember(self, key: tuple, prepared: torch.Tensor, sources: Sequence[torch.Tensor]) -> None:
        self._cache[key] = prepared
        for t in sources:
            weakref.finalize(t, self._cache.pop, key, None)

    def _can_alias(self, sources: Sequence[torch.Tensor]) -> bool:
        grad_on = torch.is_grad_enabled()
        return all(isinstance(t, torch.Tensor) and t.is_contiguous() and not (grad_on and t.requires_grad)
                   and not t.is_meta and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                   for t in sources)

    def rows(self, kind: str, sources: Sequence[torch.Tensor], mode: str) -> tuple[torch.Tensor, PreparedWeight]:
        """torch.cat(sources, 0) — [Wq; Wk; Wv] or [bq; bk; bv]."""
        return self._prepare(kind, sources, 0, mode, lambda: torch.cat(list(sources), 0))

    def gate_up(self, w_gate: torch.Tensor, w_up: torch.Tensor, block: int,
                mode: str) -> tuple[torch.Tensor, PreparedWeight]:
        aliasable = block == w_gate.shape[0]  # only then is each source one contiguous row range
        return self._prepare("gate_up", (w_gate, w_up), block, mode if aliasable else "copy",
                             lambda: prepare_gate_up(w_gate, w_up, block))

    def _prepare(self, kind, sources, block, mode, build) -> tuple[torch.Tensor, PreparedWeight]:
        if mode not in MODES:
            raise ValueError(f"weight_mode: {mode!r} is not one of {MODES}")
        key = _key(kind, sources, block)
        hit: Optional[torch.Tensor] = self._cache.get(key)
        if hit is None and (block == 0 or block == sources[0].shape[0]) and _rows_adjacent(sources):
            hit = _view_rows(sources)          # already laid out back to back: a free view
            self._remember(key, hit, sources)
        if hit is not None:
            return hit, PreparedWeight(kind, tuple(hit.shape), hit.dtype, 0, False, True)
        aliased = mode == "alias" and self._can_alias(sources)
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whatever mode the caller is in
            prepared = build()
            if aliased:
                offset = 0
                for t in sources:
                    t.data = prepared[offset:offset + t.shape[0]]
                    offset += t.shape[0]
        self._remember(_key(kind, sources, block), prepared, sources)
        extra = 0 if aliased else prepared.numel() * prepared.element_size()
        return prepared, PreparedWeight(kind, tuple(prepared.shape), prepared.dtype, extra, aliased, False)


STORE = WeightStore()
