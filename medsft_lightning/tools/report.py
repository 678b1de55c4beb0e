"""``medsft compare``'s reports: ``report.html`` (self-contained, opens offline) and ``report.md``.

The HTML page has inline CSS and an inline SVG only: no script, no font, no image, no link to any URL, so it
opens from disk anywhere. Every text from a model or a data file is escaped. Stable hooks for tests and tools:
``table#metrics`` (each figure a ``td`` with ``data-metric``, ``data-model`` and the exact ``data-value``),
``#paired`` (``data-paired`` spans), ``svg#curves`` (or ``p#no-curves``) and one ``div.card`` per question.
"""

from __future__ import annotations

import html
from pathlib import Path

from medsft_lightning.generation.generate import Generation
from medsft_lightning.tools.compare_metrics import DEFINITIONS, GENERATED, LABELS, TEACHER_FORCED
from medsft_lightning.tools.report_plot import curve_notes, curves_svg, read_curves

MODELS = {"base": "base", "tuned": "fine-tuned"}
HIGHER_BETTER = {"token_accuracy", "p_think_close", "p_im_end", "rougeL", "bleu4", "think_format_rate", "tokens_per_s"}
LOWER_BETTER = {"val_loss", "perplexity", "truncation_rate"}
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;
color:#222;background:#fafafa}
h1{margin:.2em 0}h2{margin:1.4em 0 .5em;border-bottom:1px solid #ddd}.sub{color:#555;margin:.2em 0}
table#metrics{border-collapse:collapse;background:#fff;width:100%}
#metrics th,#metrics td{border:1px solid #ddd;padding:4px 10px;text-align:right;vertical-align:top}
#metrics th[scope=row],#metrics thead th:first-child{text-align:left;font-weight:600}
#metrics .def{font-weight:400;color:#666;font-size:12px}
#metrics tr.group th{background:#eef2f7;text-align:left}#metrics td.better{background:#e5f5e5;font-weight:600}
.delta.good{color:#1a7f37}.delta.bad{color:#c62828}
.bar{display:flex;height:14px;border-radius:4px;overflow:hidden;max-width:480px;margin:6px 0}
.bar .wins{background:#2e9e4f}.bar .ties{background:#bbb}.bar .losses{background:#d9534f}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 14px;margin:12px 0}
.card h3{margin:.2em 0 .5em;font-size:16px}.qid{color:#888;margin-right:6px}
.cols{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:12px}
.col h4{margin:0 0 4px;font-size:13px;color:#444}.answer,.think{white-space:pre-wrap;overflow-wrap:anywhere;
max-height:18em;overflow:auto;font-size:13px}.think{color:#555;background:#f4f4f4;padding:4px 6px}
.badge{font-size:11px;border-radius:3px;padding:0 5px;background:#eee;color:#333;font-weight:400}
.badge.length{background:#fde2c8}.badge.win{background:#d4f0da}.badge.loss{background:#f7d4d4}
summary{cursor:pointer;color:#555;font-size:12px}svg#curves{background:#fff;border:1px solid #ddd}
svg text{font-size:11px;fill:#444}
"""


def fmt(metric: str, value: float | None) -> str:
    """A figure as the report shows it (``—`` for none); the exact value is in the cell's ``data-value``."""
    if value is None:
        return "—"
    if metric in ("think_format_rate", "truncation_rate"):
        return f"{value:.1%}"
    if metric in ("perplexity", "think_tokens", "answer_tokens", "tokens_per_s"):
        return f"{value:,.1f}"
    return f"{value:.3g}" if metric.startswith("p_") else f"{value:.4f}"


def _figure(metrics: dict, model: str, metric: str) -> float | None:
    entry = metrics["models"][model]
    return entry["teacher_forced" if metric in TEACHER_FORCED else "generation"][metric]


def _shown(metrics: dict, model: str, metric: str) -> str:
    """:func:`fmt` of a figure, or the note of a served model (``--endpoint``), which has no teacher-forced ones."""
    note = metrics["models"][model]["teacher_forced"].get("note") if metric in TEACHER_FORCED else None
    return note or fmt(metric, _figure(metrics, model, metric))


def _metric_row(metrics: dict, metric: str) -> str:
    base, tuned = (_figure(metrics, m, metric) for m in MODELS)
    cells = []
    for model, value in (("base", base), ("tuned", tuned)):
        other = tuned if model == "base" else base
        better = value is not None and other is not None and (
            (metric in HIGHER_BETTER and value > other) or (metric in LOWER_BETTER and value < other))
        exact, attr = ("" if value is None else repr(value)), (' class="better"' if better else "")
        cells.append(f'<td data-metric="{metric}" data-model="{model}" data-value="{exact}"{attr}>'
                     f"{html.escape(_shown(metrics, model, metric))}</td>")
    delta, kind = "—", ""
    if base is not None and tuned is not None:
        diff = tuned - base
        delta = ("+" if diff > 0 else "") + (f"{diff:.1%}" if metric.endswith("_rate") else f"{diff:.4g}")
        kind = " good" if (metric in HIGHER_BETTER and diff > 0) or (metric in LOWER_BETTER and diff < 0) else (
            " bad" if (metric in HIGHER_BETTER and diff < 0) or (metric in LOWER_BETTER and diff > 0) else "")
    return (f'<tr data-row="{metric}"><th scope="row">{html.escape(LABELS[metric])}<div class="def">'
            f'{html.escape(DEFINITIONS[metric])}</div></th>{"".join(cells)}<td class="delta{kind}">{delta}</td></tr>')


def metrics_table(metrics: dict) -> str:
    """``table#metrics``: teacher-forced figures first, then the generation ones, per model."""
    forced = max((metrics["models"][k]["teacher_forced"] for k in MODELS), key=lambda f: f["rows"])
    heads = "".join(f'<th data-model="{k}">{label}<div class="def">{html.escape(metrics["models"][k]["name"])}</div>'
                    f"</th>" for k, label in MODELS.items())
    rows = [f'<tr class="group"><th colspan="4">Teacher-forced on the reference answers ({forced["rows"]} rows, '
            f'{forced["tokens"]:,} supervised tokens)</th></tr>']
    rows += [_metric_row(metrics, m) for m in TEACHER_FORCED]
    rows.append(f'<tr class="group"><th colspan="4">Generated answers ({metrics["questions"]} questions)</th></tr>')
    rows += [_metric_row(metrics, m) for m in GENERATED]
    return (f'<table id="metrics"><thead><tr><th>metric</th>{heads}<th>Δ fine-tuned − base</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def paired_section(paired: dict) -> str:
    """``#paired``: wins / losses / ties on ROUGE-L and the bootstrap interval of the mean difference."""
    if not paired["n"]:
        return '<section id="paired"><h2>Question by question</h2><p>No question has a reference answer.</p></section>'

    def span(key: str, text: str | None = None) -> str:
        value = paired[key]
        shown = text if text is not None else (f"{value:+.4f}" if isinstance(value, float) else str(value))
        return f'<b data-paired="{key}" data-value="{value!r}">{shown}</b>'

    bar = "".join(f'<span class="{k}" style="width:{100 * paired[k] / paired["n"]:.2f}%"></span>'
                  for k in ("wins", "ties", "losses"))
    return (f'<section id="paired"><h2>Question by question (ROUGE-L F1)</h2><p>Of {span("n")} questions with a '
            f'reference, the fine-tuned model scores higher on {span("wins")}, lower on {span("losses")} and the '
            f'same on {span("ties")}.</p><div class="bar">{bar}</div><p>Mean difference (fine-tuned − base): '
            f'{span("mean_diff")}, 95% bootstrap confidence interval [{span("ci_low")}, {span("ci_high")}] '
            f'({paired["resamples"]:,} resamples of the questions, seed {paired["seed"]}).</p></section>')


def curves_section(metrics_csv: Path | None) -> str:
    """The run's training curves as ``svg#curves``, or ``p#no-curves`` saying why there are none."""
    curves = read_curves(metrics_csv) if metrics_csv is not None else {}
    if not curves:
        why = "no --run given" if metrics_csv is None else f"{metrics_csv} holds no train_loss, val_loss or lr"
        return f'<section id="training"><h2>Training curves</h2><p id="no-curves">No metrics.csv ({why}).</p></section>'
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in curve_notes(curves))
    return (f'<section id="training"><h2>Training curves</h2><p class="sub">{html.escape(str(metrics_csv))}</p>'
            f"{curves_svg(curves)}<ul>{notes}</ul></section>")


def _think(text: str, tokens: int | None) -> str:
    count = f"{tokens} tokens" if tokens is not None else f"{len(text)} chars"
    return (f'<details><summary>thinking ({count})</summary><div class="think">{html.escape(text)}</div></details>'
            if text else '<div class="def">no think block</div>')


def card(index: int, pair: dict) -> str:
    """One ``div.card``: the question, the reference, and both models' answers with their think folded."""
    base, tuned = pair["base"]["rougeL"], pair["tuned"]["rougeL"]
    outcome = "" if base is None or tuned is None else ("win" if tuned > base else "loss" if tuned < base else "tie")
    cols = []
    if "reference_answer" in pair or "reference_think" in pair:
        think = _think(pair.get("reference_think", ""), None) if "reference_think" in pair else ""
        cols.append(f'<div class="col reference"><h4>reference</h4>{think}<div class="answer">'
                    f'{html.escape(pair.get("reference_answer", ""))}</div></div>')
    else:
        cols.append('<div class="col reference"><h4>reference</h4><div class="def">none given</div></div>')
    for key, label in MODELS.items():
        out = pair[key]
        scores = "".join(f' · {name} {out[k]:.3f}' for k, name in (("rougeL", "ROUGE-L"), ("bleu4", "BLEU-4"))
                         if out[k] is not None)
        badge = (f'<span class="badge {out["finish_reason"]}">{out["finish_reason"]}, '
                 f'{out["num_generated_tokens"]} tok</span>')
        cols.append(f'<div class="col {key}" data-model="{key}"><h4>{label} {badge}{scores}</h4>'
                    f'{_think(out["think"], out["think_tokens"])}<div class="answer">{html.escape(out["answer"])}'
                    f"</div></div>")
    mark = f' <span class="badge {outcome}">fine-tuned: {outcome}</span>' if outcome else ""
    return (f'<div class="card" id="q{index}" data-id="{html.escape(str(pair["id"]))}" data-outcome="{outcome}">'
            f'<h3><span class="qid">#{html.escape(str(pair["id"]))}</span>{html.escape(pair["question"])}{mark}</h3>'
            f'<div class="cols">{"".join(cols)}</div></div>')


def render_html(metrics: dict, pairs: list[dict], metrics_csv: Path | None, extra_html: str = "") -> str:
    """The whole ``report.html`` page (see the module docstring); ``extra_html``: sections after the paired one
    (``medsft eval``'s benchmark and thinking-mode section of the same run)."""
    models = " · ".join(f"{label}: <b>{html.escape(metrics['models'][k]['name'])}</b> "
                        f"({html.escape(metrics['models'][k]['source'])})" for k, label in MODELS.items())
    decoding = html.escape(Generation(**metrics["decoding"]).describe())
    run = f' · run {html.escape(metrics["run"])}' if metrics.get("run") else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>medsft compare</title><style>{CSS}</style></head>'
            f'<body><header><h1>medsft compare: base vs fine-tuned</h1><p class="sub">{models}</p>'
            f'<p class="sub">{metrics["questions"]} questions{run} · decoding: {decoding} (the same prompts, settings '
            f'and seed for both)</p></header><section id="summary"><h2>Metrics</h2>{metrics_table(metrics)}</section>'
            f'{paired_section(metrics["paired"])}{extra_html}{curves_section(metrics_csv)}<section id="questions">'
            f'<h2>Questions</h2>{"".join(card(i, p) for i, p in enumerate(pairs))}</section></body></html>\n')


def _cell(text: str) -> str:
    """Text for a Markdown table cell: ``<think>`` shown, not taken for a tag; ``|`` kept inside the cell."""
    return html.escape(text, quote=False).replace("|", "\\|")


def _fence(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def render_markdown(metrics: dict, pairs: list[dict], metrics_csv: Path | None) -> str:
    """``report.md``: the same figures and answers as the HTML page, without the plot."""
    lines = ["# medsft compare: base vs fine-tuned", ""]
    lines += [f"- {label}: `{metrics['models'][k]['name']}` ({metrics['models'][k]['source']})"
              for k, label in MODELS.items()]
    lines += [f"- {metrics['questions']} questions; decoding: {Generation(**metrics['decoding']).describe()}", "",
              "## Metrics", "", "| metric | base | fine-tuned | definition |", "|---|---:|---:|---|"]
    for metric in TEACHER_FORCED + GENERATED:
        base, tuned = (_shown(metrics, m, metric) for m in MODELS)
        lines.append(f"| {_cell(LABELS[metric])} | {base} | {tuned} | {_cell(DEFINITIONS[metric])} |")
    p = metrics["paired"]
    lines += ["", "## Question by question (ROUGE-L F1)", ""]
    lines.append(f"Fine-tuned vs base on {p['n']} questions: {p['wins']} wins, {p['losses']} losses, {p['ties']} ties; "
                 f"mean difference {p['mean_diff']:+.4f}, 95% bootstrap CI [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
                 if p["n"] else "No question has a reference answer.")
    curves = read_curves(metrics_csv) if metrics_csv is not None else {}
    lines += ["", "## Training curves", ""]
    lines += [f"- {n}" for n in curve_notes(curves)] if curves else ["No metrics.csv."]
    lines += ["", "## Questions"]
    for pair in pairs:
        lines += ["", f"### #{pair['id']}: {pair['question'].splitlines()[0] if pair['question'] else ''}", ""]
        if "reference_answer" in pair:
            lines += ["reference:", _fence(pair["reference_answer"])]
        for key, label in MODELS.items():
            out = pair[key]
            lines += [f"{label} ({out['finish_reason']}, {out['num_generated_tokens']} tokens, thinking "
                      f"{out['think_tokens']} tokens):", _fence(out["answer"])]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, metrics: dict, pairs: list[dict], metrics_csv: Path | None,
                  extra_html: str = "") -> tuple[Path, Path]:
    """Write ``out/report.html`` (with ``extra_html``, see :func:`render_html`) and ``out/report.md``."""
    page, markdown = out / "report.html", out / "report.md"
    page.write_text(render_html(metrics, pairs, metrics_csv, extra_html), encoding="utf-8")
    markdown.write_text(render_markdown(metrics, pairs, metrics_csv), encoding="utf-8")
    return page, markdown
