"""``medsft eval``'s HTML section: benchmark accuracy and thinking modes, base vs tuned.

The same ``section#eval`` (its CSS inside it) goes into ``medsft eval``'s own ``report.html`` and into
``medsft compare``'s report of the same run (``extra_html`` of :func:`~medsft_lightning.tools.report.render_html`).
No script, no link, every text escaped, as the compare report. Stable hooks: ``table#eval-accuracy`` (each
accuracy a ``td`` with ``data-model``, ``data-scorer``, ``data-metric``, ``data-benchmark``, ``data-subject`` and
the exact ``data-value``; the paired difference ``data-paired``), ``table#eval-subjects`` (folded),
``p#eval-unparseable`` and
``table#thinking-modes`` (``data-mode``, ``data-check``, ``data-model``).
"""

from __future__ import annotations

import html

from medsft_lightning.generation.think_checks import CHECKS, MODE_LABELS
from medsft_lightning.tools.eval_stats import ALL

MODELS = {"base": "base", "tuned": "fine-tuned"}
SCORER_LABELS = {("loglik", "acc"): "log-likelihood, acc", ("loglik", "acc_norm"): "log-likelihood, acc_norm",
                 ("generate", "acc"): "generated answer, exact letters"}
CSS = """
#eval table{border-collapse:collapse;background:#fff;width:100%;margin:6px 0 14px}
#eval th,#eval td{border:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top;font-size:13px}
#eval th[scope=row],#eval thead th:first-child{text-align:left}#eval .ci{color:#777;font-size:11px}
#eval .sub{color:#555}#eval details{margin:0 0 14px}#eval tr.mode th{background:#eef2f7;text-align:left}
#thinking-modes th[scope=row]{font-weight:400;padding-left:18px}
"""


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _accuracy_cell(row: dict | None) -> str:
    if row is None:
        return '<td class="none">—</td>'
    attrs = " ".join(f'data-{k}="{html.escape(str(row[k]))}"' for k in ("model", "scorer", "metric", "benchmark",
                                                                            "subject"))
    return (f'<td {attrs} data-value="{row["acc"]!r}">{_pct(row["acc"])} <span class="ci">[{_pct(row["ci_low"])}, '
            f'{_pct(row["ci_high"])}] n={row["n"]}</span></td>')


def _paired_cell(row: dict | None) -> str:
    if row is None or row["mean_diff"] is None:
        return "<td>—</td>"
    p = "" if row["mcnemar_p"] is None else f", McNemar p={row['mcnemar_p']:.3g}"
    return (f'<td data-paired="{html.escape(row["benchmark"])}" data-value="{row["mean_diff"]!r}">'
            f'{row["mean_diff"]:+.1%} <span class="ci">[{row["ci_low"]:+.1%}, {row["ci_high"]:+.1%}]; '
            f'{row["wins"]} better, {row["losses"]} worse{p}</span></td>')


def accuracy_table(summary: dict, subjects: bool = False) -> str:
    """``table#eval-accuracy``: per scorer and benchmark the models, chance and tuned − base; ``subjects``:
    ``table#eval-subjects``, the same per subject (for benchmarks with several), without the paired column."""
    acc = {(r["model"], r["scorer"], r["metric"], r["benchmark"], r["subject"]): r for r in summary["accuracy"]}
    paired = {(r["scorer"], r["metric"], r["benchmark"]): r for r in summary["paired"]}
    keys = list(dict.fromkeys((r["scorer"], r["metric"], r["benchmark"], r["subject"]) for r in summary["accuracy"]
                              if (r["subject"] != ALL) == subjects))
    models = [m for m in MODELS if m in summary["models"]]
    rows = []
    for scorer, metric, benchmark, subject in keys:
        cells = [acc.get((m, scorer, metric, benchmark, subject)) for m in models]
        known = next(c for c in cells if c is not None)
        label = html.escape(f"{benchmark}: {subject}" if subjects else benchmark)
        rows.append(f'<tr><th scope="row">{label}</th><td>{html.escape(SCORER_LABELS[(scorer, metric)])}</td>'
                    f'{"".join(map(_accuracy_cell, cells))}<td data-chance="{known["chance"]!r}">'
                    f'{_pct(known["chance"])}</td>'
                    f'{"" if subjects else _paired_cell(paired.get((scorer, metric, benchmark)))}</tr>')
    heads = "".join(f"<th>{MODELS[k]}<div class='sub'>{html.escape(summary['models'][k]['name'])}</div></th>"
                    for k in models)
    last = "" if subjects else "<th>fine-tuned − base (paired, 95% CI)</th>"
    return (f'<table id="{"eval-subjects" if subjects else "eval-accuracy"}"><thead><tr><th>'
            f'{"benchmark: subject" if subjects else "benchmark"}</th><th>scorer</th>{heads}<th>chance</th>{last}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def unparseable_note(summary: dict) -> str:
    """``p#eval-unparseable``: generated answers whose letters could not be read, per model, with the reasons."""
    parts = []
    for model, label in MODELS.items():
        for benchmark, entry in summary.get("unparseable", {}).get(model, {}).items():
            reasons = "; ".join(f"{html.escape(k)}: {v}" for k, v in entry["reasons"].items())
            parts.append(f'<span data-model="{model}" data-benchmark="{html.escape(benchmark)}" '
                         f'data-value="{entry["unparseable"]}">{label}, {html.escape(benchmark)}: '
                         f'{entry["unparseable"]} of {entry["n"]}{f" ({reasons})" if reasons else ""}</span>')
    body = "<br>".join(parts) if parts else "no generated answers"
    return f'<p id="eval-unparseable">Unparseable generated answers (counted as wrong): {body}</p>'


def thinking_table(summary: dict) -> str:
    """``table#thinking-modes``: each mode's checks, base vs tuned (or ``p#no-thinking`` without them)."""
    thinking = summary.get("thinking") or {}
    if not thinking:
        return '<p id="no-thinking">No thinking-mode checks (they run with the generate scorer).</p>'
    rows = []
    for mode, checks in CHECKS.items():
        n = max((thinking.get(m, {}).get(mode, {}).get("n", 0) for m in MODELS), default=0)
        rows.append(f'<tr class="mode"><th colspan="3" scope="rowgroup">{MODE_LABELS[mode]} (n={n})</th></tr>')
        for check in (*checks, "pass"):
            cells = []
            for model in MODELS:
                rates = thinking.get(model, {}).get(mode)
                value = None if rates is None else rates.get(check)
                cells.append(f'<td data-mode="{mode}" data-check="{check}" data-model="{model}" '
                             f'data-value="{"" if value is None else repr(value)}">{_pct(value)}</td>')
            name = "<b>all checks</b>" if check == "pass" else check.replace("_", " ")
            rows.append(f'<tr><th scope="row">{name}</th>{"".join(cells)}</tr>')
    heads = "".join(f"<th>{label}</th>" for label in MODELS.values())
    return (f'<table id="thinking-modes"><thead><tr><th>thinking mode / check (share of replies)</th>{heads}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def eval_section(summary: dict) -> str:
    """``section#eval`` (see the module docstring)."""
    s = summary["settings"]
    notes = "".join(f"<li>{html.escape(b['name'])}: {html.escape('; '.join(b['notes']))}</li>"
                    for b in summary["benchmarks"])
    by_subject = (f"<details><summary>per subject (intervals wide: few questions each)</summary>"
                  f"{accuracy_table(summary, subjects=True)}</details>"
                  if any(r["subject"] != ALL for r in summary["accuracy"]) else "")
    return (f'<section id="eval"><style>{CSS}</style><h2>Medical benchmarks and thinking modes (medsft eval)</h2>'
            f'<p class="sub">{summary["questions"]} questions · scorers: {html.escape(", ".join(s["scorers"]))} · '
            f'thinking budget {s["max_think_tokens"]} tokens, answer {s["max_answer_tokens"]} · accuracy with a '
            f'Wilson 95% interval; the paired difference with a bootstrap 95% interval over the questions</p>'
            f'<ul class="sub">{notes}</ul>{accuracy_table(summary)}{unparseable_note(summary)}{by_subject}'
            f'<h3>Thinking modes</h3>{thinking_table(summary)}</section>')


def render_page(summary: dict) -> str:
    """``medsft eval``'s own ``report.html``: the section on a page of its own."""
    from medsft_lightning.tools.report import CSS as BASE_CSS

    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>medsft eval</title><style>'
            f'{BASE_CSS}</style></head><body><header><h1>medsft eval: base vs fine-tuned</h1></header>'
            f'{eval_section(summary)}</body></html>\n')
