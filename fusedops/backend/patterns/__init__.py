"""The pattern table: applied in this order, longest (most-consuming) fusions first, so that a
shorter pattern never takes nodes a longer one needs. Each pattern counts its matches in the
report and logs every near-miss with its reason."""
from __future__ import annotations

from .base import Context, Pattern, op_counts
from .attention import AttentionPattern
from .linear import LinearResidualPattern, PlainLinearPattern, QkvPattern
from .mlp import GateUpSiluPattern
from .norm import RmsNormPattern
from .residual import ResidualStreamPattern
from .rope import RopePattern

PATTERNS: tuple[Pattern, ...] = (
    GateUpSiluPattern(),      # takes gate, up, act and mul before qkv could group gate with up
    QkvPattern(),
    LinearResidualPattern(),  # takes the residual adds before add_rms_norm (see linear.py)
    RmsNormPattern(),         # rms_norm, or add_rms_norm when the add is still there
    ResidualStreamPattern(),  # h between add_rms_norms in fp32
    RopePattern(),            # rope_cache_write (rope + both cache writes) before plain rope
    AttentionPattern(),       # after the cache writes are known, for kv_len
    PlainLinearPattern(),     # whatever projection is left (lm_head)
)

ALL_FUSIONS = frozenset(name for p in PATTERNS for name in p.names)

__all__ = ["ALL_FUSIONS", "PATTERNS", "Context", "Pattern", "op_counts"]
