"""What ``medsft eval`` writes: its files, its SwanLab run, and its section in the run's compare report.

In ``--output_dir``: ``answers.jsonl`` (one line per question, model and scorer: the gold letters, each option's
log-likelihood or the generated text, what was chosen and whether it was right), ``thinking.jsonl`` (one line per
thinking-mode reply with its checks), ``summary.json`` (every figure), ``metrics.csv`` (the same figures, one per
line) and ``report.html`` (:mod:`~medsft_lightning.tools.eval_report`). The figures go to SwanLab too
(``--swanlab``, as ``medsft fit``'s ``auto``: online with a key, else offline files in ``OUT/swanlog``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from medsft_lightning.tools.eval_report import eval_section, render_page
from medsft_lightning.tools.eval_stats import ALL

logger = logging.getLogger(__name__)
CSV_FIELDS = ("kind", "model", "scorer", "metric", "benchmark", "subject", "n", "value", "ci_low", "ci_high",
              "chance", "p_value")


def _jsonl(path: Path, rows: Sequence[dict]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def csv_rows(summary: dict) -> list[dict]:
    """``metrics.csv``'s lines: accuracies, paired differences (model ``tuned-base``) and thinking-mode rates."""
    rows = [{"kind": "accuracy", **{k: r[k] for k in ("model", "scorer", "metric", "benchmark", "subject", "n",
                                                      "ci_low", "ci_high", "chance")}, "value": r["acc"]}
            for r in summary["accuracy"]]
    rows += [{"kind": "paired", "model": "tuned-base", "scorer": r["scorer"], "metric": r["metric"],
              "benchmark": r["benchmark"], "subject": ALL, "n": r["n"], "value": r["mean_diff"], "ci_low": r["ci_low"],
              "ci_high": r["ci_high"], "p_value": r["mcnemar_p"]} for r in summary["paired"]]
    for model, modes in (summary.get("thinking") or {}).items():
        for mode, rates in modes.items():
            rows += [{"kind": "thinking", "model": model, "scorer": mode, "metric": check, "n": rates["n"],
                      "value": value} for check, value in rates.items() if check != "n"]
    return rows


def write_outputs(out: Path, summary: dict, answers: Sequence[dict], thinking: Sequence[dict]) -> dict[str, Path]:
    """Write every file of ``--output_dir`` (see the module docstring); returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"answers": _jsonl(out / "answers.jsonl", answers), "thinking": _jsonl(out / "thinking.jsonl", thinking)}
    files["summary"] = out / "summary.json"
    files["summary"].write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    files["metrics"] = out / "metrics.csv"
    with files["metrics"].open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(csv_rows(summary))
    files["report"] = out / "report.html"
    files["report"].write_text(render_page(summary), encoding="utf-8")
    return files


def swanlab_figures(summary: dict) -> dict[str, float]:
    """The figures as SwanLab keys: ``eval/<model>/<benchmark>[/<subject>]/<scorer>_<metric>``,
    ``eval/tuned-base/<benchmark>/<scorer>_<metric>`` and ``thinking/<model>/<mode>/<check>``."""
    out = {}
    for r in summary["accuracy"]:
        where = r["benchmark"] if r["subject"] == ALL else f"{r['benchmark']}/{r['subject']}"
        out[f"eval/{r['model']}/{where}/{r['scorer']}_{r['metric']}"] = r["acc"]
    for r in summary["paired"]:
        if r["mean_diff"] is not None:
            out[f"eval/tuned-base/{r['benchmark']}/{r['scorer']}_{r['metric']}"] = r["mean_diff"]
    for row in csv_rows(summary):
        if row["kind"] == "thinking" and row["value"] is not None:
            out[f"thinking/{row['model']}/{row['scorer']}/{row['metric']}"] = row["value"]
    return out


def log_swanlab(summary: dict, mode: str, project: str, out: Path, name: str) -> str:
    """Log the figures to a SwanLab run of their own; returns the mode used (``disabled``: nothing done)."""
    from medsft_lightning.training.loggers import resolve_mode

    mode = resolve_mode(mode)
    if mode == "disabled":
        return mode
    import swanlab

    try:  # the files are written already: a SwanLab problem (no network, a bad SWANLAB_* variable) only warns
        swanlab.init(project=project, name=name, mode=mode, log_dir=str(out / "swanlog"),
                     config={"models": summary["models"], "settings": summary["settings"]})
        try:
            swanlab.log(swanlab_figures(summary))
        finally:
            swanlab.finish()
    except Exception as err:
        logger.warning("[eval] SwanLab (%s) failed, nothing logged there (%s: %s); the files in %s hold every figure",
                       mode, type(err).__name__, " ".join(str(err).split())[:300], out)
        return "failed"
    logger.info("[eval] SwanLab (%s): project %s, run %s", mode, project, name)
    return mode


def run_eval_section(run: Path | None) -> str:
    """``medsft eval``'s section for ``medsft compare``'s report of ``run`` (``RUN/eval/summary.json``), or ``""``."""
    summary = run / "eval" / "summary.json" if run is not None else None
    if summary is None or not summary.is_file():
        return ""
    return eval_section(json.loads(summary.read_text(encoding="utf-8")))


def update_compare_report(run: Path, summary: dict) -> Path | None:
    """Re-write ``RUN/compare``'s reports (when ``medsft compare --run RUN`` wrote them) with the eval section."""
    from medsft_lightning.tools.report import write_reports

    folder = run / "compare"
    if not (folder / "metrics.json").is_file() or not (folder / "pairs.jsonl").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text(encoding="utf-8").splitlines() if line]
    csv_file = run / "metrics.csv"
    page, _ = write_reports(folder, metrics, pairs, csv_file if csv_file.is_file() else None, eval_section(summary))
    return page
