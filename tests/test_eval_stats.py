"""``medsft eval``'s figures against scipy: the Wilson interval and McNemar's exact test; grouping and pairing."""

from __future__ import annotations

import pytest

from medsft_lightning.tools.eval_stats import ALL, accuracy_rows, chance, mcnemar_p, paired_rows, unparseable, wilson

scipy_stats = pytest.importorskip("scipy.stats")  # lm-eval's dependency, in the dev extra


@pytest.mark.parametrize("correct, n", [(0, 5), (3, 10), (17, 24), (50, 50), (1, 1)])
def test_wilson_interval_is_scipys(correct, n):
    ci = scipy_stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(correct, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


@pytest.mark.parametrize("wins, losses", [(0, 6), (2, 9), (5, 5), (1, 0), (12, 3)])
def test_mcnemar_exact_p_is_scipys_binomial_test(wins, losses):
    assert mcnemar_p(wins, losses) == pytest.approx(scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue)


def _record(model, scorer, bench, subject, qid, correct, **extra):
    return {"model": model, "scorer": scorer, "benchmark": bench, "subject": subject, "id": qid, "correct": correct,
            "chance": 0.25, **extra}


def test_accuracy_per_benchmark_and_subject_and_the_paired_difference():
    records = []
    for i in range(8):
        subject = "cardiology" if i < 4 else "pharmacology"
        records.append(_record("base", "generate", "b1", subject, i, i < 2, unparseable=None if i else "empty answer"))
        records.append(_record("tuned", "generate", "b1", subject, i, i < 6))
    records.append(_record("tuned", "generate", "b2", None, 0, True))
    rows = {(r["model"], r["benchmark"], r["subject"]): r for r in accuracy_rows(records)}
    assert rows[("base", "b1", ALL)]["acc"] == 2 / 8 and rows[("tuned", "b1", "pharmacology")]["acc"] == 2 / 4
    assert rows[("tuned", ALL, ALL)]["n"] == 9 and ("base", "b2", ALL) not in rows
    assert rows[("base", "b1", ALL)]["chance"] == 0.25
    (pair,) = [r for r in paired_rows(records) if r["benchmark"] == "b1"]
    assert (pair["n"], pair["wins"], pair["losses"], pair["mean_diff"]) == (8, 4, 0, 0.5)
    assert pair["ci_low"] > 0 and pair["mcnemar_p"] == pytest.approx(0.125)
    assert unparseable(records)["base"]["b1"] == {"n": 8, "unparseable": 1, "reasons": {"empty answer": 1}}


def test_chance_levels():
    four = {"options": dict.fromkeys("ABCD", "x"), "answer": "B"}
    assert chance(four, "loglik") == chance(four, "generate") == 0.25
    assert chance({**four, "answer": "AC"}, "generate") == 1 / 15  # any non-empty set of 4 letters
