"""``medsft eval``'s figures: accuracy with its 95% interval and chance level, and base vs tuned question by question.

- ``acc`` per (model, scorer, metric, benchmark, subject) with a Wilson score 95% interval (right for small n and
  for accuracies near 0 or 1, unlike the normal approximation), and the chance level: the mean over the
  questions of 1/options for one answer, 1/(2^options − 1) (any non-empty set of letters) for a multi-answer
  question scored by exact match;
- the paired difference tuned − base on the same questions: :func:`~medsft_lightning.tools.compare_metrics.paired`'s
  seeded bootstrap interval of the mean difference (as ``medsft compare`` reports ROUGE-L), wins / losses
  (the discordant questions) and McNemar's exact two-sided p-value on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from medsft_lightning.tools.compare_metrics import paired

Z95 = 1.959963984540054
# (scorer, metric): the record field that says whether the question was answered right
METRICS = {("loglik", "acc"): "correct", ("loglik", "acc_norm"): "correct_norm", ("generate", "acc"): "correct"}
ALL = "(all)"


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of ``correct`` / ``n``.

    >>> [round(x, 4) for x in wilson(8, 10)]
    [0.4902, 0.9433]
    """
    if n == 0:
        return None, None
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def chance(question: Mapping, scorer: str) -> float:
    """The accuracy of a uniform random guess (see the module docstring)."""
    n = len(question["options"])
    return 1 / (2**n - 1) if scorer == "generate" and len(question["answer"]) > 1 else 1 / n


def mcnemar_p(wins: int, losses: int) -> float | None:
    """McNemar's exact test: two-sided binomial p-value of ``wins`` vs ``losses`` discordant pairs (``None``
    without any).

    >>> mcnemar_p(0, 6), mcnemar_p(3, 3)
    (0.03125, 1.0)
    """
    n = wins + losses
    if n == 0:
        return None
    tail = sum(math.comb(n, k) for k in range(0, min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _groups(records: Sequence[Mapping]) -> Iterable[tuple[str, str, list[Mapping]]]:
    """``(benchmark, subject, records)``: each benchmark whole, each of its subjects when it has several, and
    every benchmark together when there are several."""
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in records))
    if len(benchmarks) > 1:
        yield ALL, ALL, list(records)
    for name in benchmarks:
        mine = [r for r in records if r["benchmark"] == name]
        yield name, ALL, mine
        subjects = list(dict.fromkeys(r["subject"] or "(none)" for r in mine))
        if len(subjects) > 1:
            for subject in sorted(subjects):
                yield name, subject, [r for r in mine if (r["subject"] or "(none)") == subject]


def accuracy_rows(records: Sequence[Mapping]) -> list[dict]:
    """One row per model, scorer, metric, benchmark and subject (see the module docstring); ``records`` are the
    per-question lines of ``answers.jsonl`` (``model``, ``scorer``, ``benchmark``, ``subject``, ``correct``…)."""
    rows = []
    for (scorer, metric), key in METRICS.items():
        for model in ("base", "tuned"):
            scored = [r for r in records if r["model"] == model and r["scorer"] == scorer]
            for benchmark, subject, group in _groups(scored) if scored else ():
                correct = sum(bool(r[key]) for r in group)
                low, high = wilson(correct, len(group))
                rows.append({"model": model, "scorer": scorer, "metric": metric, "benchmark": benchmark,
                             "subject": subject, "n": len(group), "correct": correct, "acc": correct / len(group),
                             "ci_low": low, "ci_high": high,
                             "chance": sum(r["chance"] for r in group) / len(group)})
    return rows


def paired_rows(records: Sequence[Mapping], seed: int = 0) -> list[dict]:
    """Tuned − base per scorer, metric and benchmark, on the questions both models were scored on."""
    rows = []
    for (scorer, metric), key in METRICS.items():
        scored = {(r["model"], r["benchmark"], r["id"]): r for r in records if r["scorer"] == scorer}
        both = [r for (model, bench, qid), r in scored.items() if model == "base" and ("tuned", bench, qid) in scored]
        for benchmark, subject, group in _groups(both) if both else ():
            if subject != ALL:
                continue
            base = [float(bool(r[key])) for r in group]
            tuned = [float(bool(scored[("tuned", r["benchmark"], r["id"])][key])) for r in group]
            figures = paired(base, tuned, seed=seed)
            rows.append({"scorer": scorer, "metric": metric, "benchmark": benchmark, **figures,
                         "mcnemar_p": mcnemar_p(figures["wins"], figures["losses"])})
    return rows


def unparseable(records: Sequence[Mapping]) -> dict:
    """Per model and benchmark: generated answers with no readable letters, and why (counted as wrong)."""
    out: dict = {}
    for r in records:
        if r["scorer"] != "generate":
            continue
        entry = out.setdefault(r["model"], {}).setdefault(r["benchmark"], {"n": 0, "unparseable": 0, "reasons": {}})
        entry["n"] += 1
        if r.get("unparseable"):
            entry["unparseable"] += 1
            entry["reasons"][r["unparseable"]] = entry["reasons"].get(r["unparseable"], 0) + 1
    return out
