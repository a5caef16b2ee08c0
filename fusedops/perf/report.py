"""Output of the comparison: markdown tables (printed and written under perf/out/) and a PNG plot of
tok/s by decode batch size and by prompt length, one line per backend."""
from __future__ import annotations

from pathlib import Path

from .measure import PARITY_MARGIN, BackendResult


def _num(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ratio(value: float, base: BackendResult | None, key: str, match_key: str, match) -> str:
    """value ÷ the baseline's value in the row with the same batch / prompt length."""
    if base is None or base.status != "ok":
        return "–"
    rows = base.decode if match_key == "batch" else base.prefill
    for row in rows:
        if row[match_key] == match:
            return f"{value / row[key]:.2f}×"
    return "–"


def _table(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_rows(results: list[BackendResult]) -> list[dict]:
    return [{"backend": r.name, "status": r.status,
             "logits err vs fp32": "–" if r.rel_err is None else f"{r.rel_err:.2e}",
             "err per prompt": ", ".join(f"{e:.2e}" for e in r.rel_errs) or "–",
             "greedy agree": "–" if r.agreement is None else f"{r.agreement:.0%}",
             "compile s (prefill, cold)": _num(r.cold_prefill_s), "compile s (decode, cold)": _num(r.cold_decode_s),
             "compile s (decode, warm)": _num(r.warm_decode_s), "peak GiB": _num(r.peak_gib, 2),
             "note": r.note} for r in results]


def decode_rows(results: list[BackendResult]) -> list[dict]:
    by_name = {r.name: r for r in results}
    rows = []
    for r in results:
        for d in r.decode:
            rows.append({"backend": r.name, "batch": d["batch"], "tok/s": _num(d["tok_s"]),
                         "step ms": _num(d["step_ms"], 2), "p50 ms": _num(d["p50_ms"], 2),
                         "p99 ms": _num(d["p99_ms"], 2), "roofline %": _num(d["roofline_pct"]),
                         "first call s": _num(d["first_call_s"]),
                         "vs eager": _ratio(d["tok_s"], by_name.get("eager"), "tok_s", "batch", d["batch"]),
                         "vs inductor-ro": _ratio(d["tok_s"], by_name.get("inductor-ro"), "tok_s", "batch",
                                                  d["batch"])})
    return rows


def prefill_rows(results: list[BackendResult]) -> list[dict]:
    by_name = {r.name: r for r in results}
    rows = []
    for r in results:
        for p in r.prefill:
            rows.append({"backend": r.name, "tokens": p["tokens"], "tok/s": _num(p["tok_s"], 0),
                         "ms": _num(p["ms"], 2), "TFLOP/s": _num(p["tflops"]),
                         "% of GEMM peak": _num(p["gemm_peak_pct"]), "first call s": _num(p["first_call_s"]),
                         "vs eager": _ratio(p["tok_s"], by_name.get("eager"), "tok_s", "tokens", p["tokens"]),
                         "vs inductor": _ratio(p["tok_s"], by_name.get("inductor"), "tok_s", "tokens",
                                               p["tokens"]),
                         "vs liger": _ratio(p["tok_s"], by_name.get("liger"), "tok_s", "tokens", p["tokens"])})
    return rows


def markdown(header: dict, results: list[BackendResult], speed_note: str | None) -> str:
    lines = [f"# fusedops end-to-end comparison: {header['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "model"]
    lines += ["", f"Parity: logits of a prompt + greedy steps (teacher-forced with the fp32 model's tokens) vs "
              f"the fp32 model with the same weights; a backend whose error exceeds {PARITY_MARGIN:g}× eager's "
              f"gets no speed numbers.", ""]
    parts = ["\n".join(lines), _table("Backends", summary_rows(results))]
    if speed_note:
        parts.append(speed_note + "\n")
    parts.append(_table("Decode (StaticCache, greedy, tok/s = batch ÷ mean step time)", decode_rows(results)))
    parts.append(_table("Prefill (batch 1, into a StaticCache)", prefill_rows(results)))
    return "\n".join(p for p in parts if p)


def plot(results: list[BackendResult], title: str, path: Path) -> str | None:
    """PNG with decode tok/s by batch and prefill tok/s by length; returns why it was skipped, or None."""
    ok = [r for r in results if r.status == "ok" and (r.decode or r.prefill)]
    if not ok:
        return "no speed numbers to plot"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (dec, pre) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        if r.decode:
            dec.plot([d["batch"] for d in r.decode], [d["tok_s"] for d in r.decode], marker="o", label=r.name)
        if r.prefill:
            pre.plot([p["tokens"] for p in r.prefill], [p["tok_s"] for p in r.prefill], marker="o", label=r.name)
    for ax, xlabel, sub in ((dec, "decode batch size", "decode"), (pre, "prompt tokens (batch 1)", "prefill")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens / s")
        ax.set_title(sub)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
