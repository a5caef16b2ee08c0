"""What a rewrite did, in words: matches per pattern, each replacement, each near-miss with its
reason, each fallback, prepared weights and the time spent. `Report.format()` is the text that
`fusedops.explain(...)`, `options={"dry_run": True}` and `FUSEDOPS_LOG=1` print."""
from __future__ import annotations

import collections
import dataclasses
import os
import sys

LOG_ENV = "FUSEDOPS_LOG"


def log_enabled() -> bool:
    return os.environ.get(LOG_ENV, "") not in ("", "0")


@dataclasses.dataclass
class NearMiss:
    pattern: str
    node: str
    reason: str


@dataclasses.dataclass
class Report:
    matches: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    replacements: list[str] = dataclasses.field(default_factory=list)
    near_misses: list[NearMiss] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    weights: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # free lines for later stages (buckets, capture)
    ops_before: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ops_after: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    extra_weight_bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    def matched(self, pattern: str, description: str) -> None:
        self.matches[pattern] += 1
        self.replacements.append(f"{pattern}: {description}")

    def near_miss(self, pattern: str, node, reason: str) -> None:
        self.near_misses.append(NearMiss(pattern, getattr(node, "name", str(node)), reason))

    def fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)

    def format(self, verbose: bool = True) -> str:
        head = "fusedops rewrite" + (" (dry run: graph unchanged)" if self.dry_run else "")
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(self.matches.items())) or "none"
        lines = [f"{head}: {counts} in {self.seconds * 1e3:.1f} ms"]
        if verbose:
            lines += [f"  replaced  {r}" for r in self.replacements]
        lines += [f"  near-miss {m.pattern} at {m.node}: {m.reason}" for m in self.near_misses]
        lines += [f"  fallback  {f}" for f in self.fallbacks]
        lines += [f"  weights   {w}" for w in self.weights]
        if self.weights:
            lines.append(f"  weights   extra memory {self.extra_weight_bytes / 2**20:.1f} MiB")
        lines += [f"  note      {n}" for n in self.notes]
        return "\n".join(lines)

    def emit(self) -> None:
        """Print to stderr when FUSEDOPS_LOG is set (or always for a dry run)."""
        if self.dry_run or log_enabled():
            print(self.format(verbose=log_enabled() or self.dry_run), file=sys.stderr)
