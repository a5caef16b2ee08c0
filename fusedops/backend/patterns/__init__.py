"""The pattern table: applied in this order, longest (most-consuming) fusions first, so that a
shorter pattern never takes nodes a longer one needs. Each pattern counts its matches in the
report and logs every near-miss with its reason."""
from __future__ import annotations

from .base import Context, Pattern, op_counts
from .norm import RmsNormPattern

PATTERNS: tuple[Pattern, ...] = (
    RmsNormPattern(),
)

ALL_FUSIONS = frozenset(name for p in PATTERNS for name in p.names)

__all__ = ["ALL_FUSIONS", "PATTERNS", "Context", "Pattern", "op_counts"]
