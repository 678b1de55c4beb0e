"""``medsft eval``'s HTML section: benchmark accuracy and thinking modes, base vs tuned.

The same ``section#eval`` (its CSS inside it) goes into ``medsft eval``'s own ``report.html`` and into
``medsft compare``'s report of the same run (``extra_html`` of :func:`~medsft_lightning.tools.report.render_html`).
No script, no link, every text escaped, as the compare report. Stable hooks: ``table#eval-accuracy`` (each
accuracy a ``td`` with ``data-model``, ``data-scorer``, ``data-metric``, ``data-benchmark``, ``data-subject`` and
the exact ``data-value``; the paired difference ``data-paired``), ``p#eval-unparseable`` and
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
#eval .sub{color:#555}#eval tr.subject th{font-weight:400;padding-left:22px}
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


def accuracy_table(summary: dict) -> str:
    """``table#eval-accuracy``: per scorer, benchmark and subject the two models, chance and tuned − base."""
    acc = {(r["model"], r["scorer"], r["metric"], r["benchmark"], r["subject"]): r for r in summary["accuracy"]}
    paired = {(r["scorer"], r["metric"], r["benchmark"]): r for r in summary["paired"]}
    keys = list(dict.fromkeys((r["scorer"], r["metric"], r["benchmark"], r["subject"]) for r in summary["accuracy"]))
    rows = []
    for scorer, metric, benchmark, subject in keys:
        cells = [acc.get((m, scorer, metric, benchmark, subject)) for m in MODELS]
        known = next(c for c in cells if c is not None)
        label = html.escape(benchmark if subject == ALL else subject)
        rows.append(f'<tr class="{"subject" if subject != ALL else "benchmark"}"><th scope="row">{label}</th>'
                    f'<td>{html.escape(SCORER_LABELS[(scorer, metric)])}</td>{"".join(map(_accuracy_cell, cells))}'
                    f'<td data-chance="{known["chance"]!r}">{_pct(known["chance"])}</td>'
                    f'{_paired_cell(paired.get((scorer, metric, benchmark)) if subject == ALL else None)}</tr>')
    heads = "".join(f"<th>{label}<div class='sub'>{html.escape(summary['models'][k]['name'])}</div></th>"
                    for k, label in MODELS.items() if k in summary["models"])
    return (f'<table id="eval-accuracy"><thead><tr><th>benchmark / subject</th><th>scorer</th>{heads}<th>chance</th>'
            f'<th>fine-tuned − base (paired, 95% CI)</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


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
        for check in (*checks, "pass"):
            cells = []
            for model in MODELS:
                rates = thinking.get(model, {}).get(mode)
                value = None if rates is None else rates.get(check)
                cells.append(f'<td data-mode="{mode}" data-check="{check}" data-model="{model}" '
                             f'data-value="{"" if value is None else repr(value)}">{_pct(value)}</td>')
            n = max((thinking.get(m, {}).get(mode, {}).get("n", 0) for m in MODELS), default=0)
            name = f"<b>{MODE_LABELS[mode]}</b>: all checks (n={n})" if check == "pass" else check.replace("_", " ")
            rows.append(f'<tr><th scope="row">{name}</th>{"".join(cells)}</tr>')
    heads = "".join(f"<th>{label}</th>" for label in MODELS.values())
    return (f'<table id="thinking-modes"><thead><tr><th>thinking mode / check (share of replies)</th>{heads}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def eval_section(summary: dict) -> str:
    """``section#eval`` (see the module docstring)."""
    s = summary["settings"]
    notes = "".join(f"<li>{html.escape(b['name'])}: {html.escape('; '.join(b['notes']))}</li>"
                    for b in summary["benchmarks"])
    return (f'<section id="eval"><style>{CSS}</style><h2>Medical benchmarks and thinking modes (medsft eval)</h2>'
            f'<p class="sub">{summary["questions"]} questions · scorers: {html.escape(", ".join(s["scorers"]))} · '
            f'thinking budget {s["max_think_tokens"]} tokens, answer {s["max_answer_tokens"]} · accuracy with a '
            f'Wilson 95% interval; the paired difference with a bootstrap 95% interval over the questions</p>'
            f'<ul class="sub">{notes}</ul>{accuracy_table(summary)}{unparseable_note(summary)}'
            f'<h3>Thinking modes</h3>{thinking_table(summary)}</section>')


def render_page(summary: dict) -> str:
    """``medsft eval``'s own ``report.html``: the section on a page of its own."""
    from medsft_lightning.tools.report import CSS as BASE_CSS

    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>medsft eval</title><style>'
            f'{BASE_CSS}</style></head><body><header><h1>medsft eval: base vs fine-tuned</h1></header>'
            f'{eval_section(summary)}</body></html>\n')
