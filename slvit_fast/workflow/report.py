"""Plain-text tables of ``report.json`` dictionaries (what ``train``, ``evaluate`` and ``demo`` print)."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["fmt_count", "format_report", "format_comparison"]

_LABEL = {"slvit": "SL-ViT", "cnn": "CNN"}


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _table(head: list[str], body: list[list[str]], left: int) -> list[str]:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    rule = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))), rule]
    for b in body:
        out.append("  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(b, widths))))
    return out


def _rows(report: Mapping[str, Any], label: str | None) -> list[list[str]]:
    body = []
    for r in report["exits"]:
        feats = "x".join(str(v) for v in r["features"]) if r["features"] else "-"
        cells = [r["name"], r["module"], feats, fmt_count(r["params"]),
                 fmt_count(r["exit_flops"]) if r["name"] != "final" else "-", fmt_count(r["total_flops"]),
                 f"{100 * r['accuracy']:.1f}%"]
        body.append(([label] if label is not None else []) + cells)
    return body


def _early_lines(report: Mapping[str, Any], label: str = "") -> list[str]:
    e, w = report["early_exit"], report["wall_clock"]
    names = [r["name"] for r in report["exits"]]
    fractions = " / ".join(f"{n} {100 * f:.0f}%" for n, f in zip(names, e["exit_fractions"]))
    prefix = f"{label} " if label else ""
    return [
        f"{prefix}early exit {e['policy']}: accuracy {100 * e['accuracy']:.1f}%, mean {fmt_count(e['mean_flops'])}"
        f"FLOPs per sample vs {fmt_count(e['backbone_flops'])} for the backbone ({e['flops_speedup']:.2f}x fewer); "
        f"answered at {fractions}; equals brute force: {'yes' if e['matches_brute_force'] else 'NO'}",
        f"{prefix}wall-clock (test split, batch {w['batch_size']}, {w['threads']} thread{'s' if w['threads'] != 1 else ''}, "
        f"best of {w['repeats']}): "
        f"backbone {w['backbone_ms_per_sample']:.3f} ms/sample, early exit {w['early_exit_ms_per_sample']:.3f} "
        f"ms/sample -> {w['speedup']:.2f}x" + _prepared_note(report.get("prepared")),
    ]


def _prepared_note(prepared: Mapping[str, Any] | None) -> str:
    if not prepared:
        return ""
    huge = prepared.get("exit_weights_huge_page_bytes")
    pages = "" if huge is None else (", exit weights in 2 MiB pages" if huge else ", no 2 MiB pages given")
    return (f" (prepared for inference: {prepared['batchnorms_folded']} BatchNorms folded, "
            f"{prepared['memory_format'] or 'memory format unchanged'}{pages})")


def format_report(report: Mapping[str, Any], title: str = "") -> str:
    """One run: the per-exit table (params, FLOPs, test accuracy) and the early-exit lines."""
    head = ["exit", "module", "features", "params", "exit FLOPs", "total FLOPs", "accuracy"]
    lines = [title] if title else []
    lines += _table(head, _rows(report, None), 3)
    lines += _early_lines(report)
    return "\n".join(lines)


def format_comparison(reports: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """Several exit types on one backbone (the demo): one table, then each type's early-exit lines."""
    head = ["exits", "exit", "module", "features", "params", "exit FLOPs", "total FLOPs", "accuracy"]
    body = []
    for kind, rep in reports.items():
        rows = _rows(rep, _LABEL.get(kind, kind))
        body += rows[:-1]
        final = rows[-1]
    body.append(["backbone"] + final[1:])
    lines = [title] if title else []
    lines += _table(head, body, 4)
    for kind, rep in reports.items():
        lines += _early_lines(rep, f"{_LABEL.get(kind, kind)}:")
    return "\n".join(lines)
