"""``medsft eval`` on a run folder built here: its files, its figures, its report in Chromium, and its section in the
run's ``medsft compare`` report; the vLLM engine's side of the thinking budget against a stand-in worker."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medsft_lightning.data.benchmarks import MCQ_SAMPLE, load_benchmark
from medsft_lightning.generation.generate import Generation
from medsft_lightning.generation.mcq_generate import LocalReplier, vllm_token_engine
from medsft_lightning.generation.vllm_engine import VllmEngine
from medsft_lightning.tools import compare, eval_io
from medsft_lightning.tools import eval as eval_command
from tests.browser import browser
from tests.conftest import make_rows, offline_env, write_jsonl
from tests.test_compare import _perturbed_export
from tests.test_predict_vllm import STAND_IN

FLAGS = ["--limit", "6", "--think_checks", "3", "--max_think_tokens", "6", "--max_answer_tokens", "4", "--greedy",
         "--swanlab", "disabled"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir) -> Path:
    """A run folder as ``medsft fit`` leaves it (config.yaml, hf_model: the tiny model with noise on its weights),
    evaluated by ``medsft eval RUN/hf_model --base TINY`` (the run found from the model's folder), then compared."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "runs" / "demo" / "version_0"
    run.mkdir(parents=True)
    data = write_jsonl(root / "rows.jsonl", make_rows(8))
    config = {"model": {"model_name_or_path": str(tiny_dir)},
              "data": {"dataset": str(data), "val_fraction": 0.25, "max_length": 256, "system_prompt": "Be careful."}}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    _perturbed_export(tiny_dir, run / "hf_model")
    eval_command.main([str(run / "hf_model"), "--base", str(tiny_dir), *FLAGS])
    compare.main(["--run", str(run), "--limit", "1", "--max_new_tokens", "4", "--greedy"])
    return run


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_writes_every_file_and_its_figures_follow_from_the_answers(run):
    out = run / "eval"
    assert {p.name for p in out.iterdir()} == {"answers.jsonl", "thinking.jsonl", "summary.json", "metrics.csv",
                                               "report.html"}
    answers, summary = _lines(out / "answers.jsonl"), json.loads((out / "summary.json").read_text(encoding="utf-8"))
    questions = load_benchmark(MCQ_SAMPLE).questions[:6]  # --limit 6: zh-06 is the multi-answer one
    assert len(answers) == 2 * (5 + 6)  # loglik leaves the multi-answer question out; generate scores all
    assert summary["models"]["base"]["loglik_skipped_multi_answer"] == {"mcq-sample": 1}
    for line in answers:
        question = next(q for q in questions if q["id"] == line["id"])
        assert line["answer"] == question["answer"] and line["options"] == question["options"]
        if line["scorer"] == "loglik":
            assert set(line["logliks"]) == set(question["options"]) and line["correct"] == (line["chosen"] ==
                                                                                            line["answer"])
        else:
            assert line["correct"] == (line["chosen"] == line["answer"]) and "raw" in line
            assert (line["chosen"] is None) == (line["unparseable"] is not None)
    for row in summary["accuracy"]:
        if row["subject"] == "(all)":
            mine = [a for a in answers if a["model"] == row["model"] and a["scorer"] == row["scorer"]]
            key = "correct_norm" if row["metric"] == "acc_norm" else "correct"
            assert row["acc"] == sum(a[key] for a in mine) / len(mine) and row["n"] == len(mine)
    assert {(p["scorer"], p["metric"]) for p in summary["paired"]} == {("loglik", "acc"), ("loglik", "acc_norm"),
                                                                       ("generate", "acc")}
    thinking = _lines(out / "thinking.jsonl")
    assert len(thinking) == 2 * 3 * 3 and summary["thinking"]["tuned"]["no_think_flag"]["n"] == 3
    assert summary["settings"]["system_prompt"] == "Be careful."  # the run's data.system_prompt
    with (out / "metrics.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"accuracy", "paired", "thinking"}
    assert len([r for r in rows if r["kind"] == "accuracy"]) == len(summary["accuracy"])


def test_the_report_section_opens_in_chromium_in_both_reports(run):
    summary = json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    compare_page = run / "compare" / "report.html"
    assert 'id="eval"' in compare_page.read_text(encoding="utf-8")  # compare found RUN/eval/summary.json
    compare_page.write_text("stale", encoding="utf-8")
    assert eval_io.update_compare_report(run, summary) == compare_page  # and eval re-writes compare's report
    accuracy = {(r["model"], r["scorer"], r["metric"]): r["acc"] for r in summary["accuracy"]
                if r["subject"] == "(all)"}
    for page in (run / "eval" / "report.html", compare_page):
        with browser() as b:
            b.page.goto(page.as_uri())
            assert b.page.locator("section#eval h2").inner_text().startswith("Medical benchmarks")
            cells = b.page.locator('table#eval-accuracy td[data-model][data-subject="(all)"]')
            shown = {tuple(c.get_attribute(f"data-{k}") for k in ("model", "scorer", "metric")):
                     float(c.get_attribute("data-value")) for c in cells.all()}
            assert shown == accuracy
            mode = b.page.locator('table#thinking-modes td[data-mode="no_think_switch"][data-check="pass"]')
            assert mode.count() == 2 and mode.first.is_visible()
            assert "of 6" in b.page.locator("#eval-unparseable").inner_text()
            assert b.requests == [page.as_uri()]  # the file itself, nothing else


def test_the_vllm_engine_runs_both_budget_rounds_through_the_worker(tmp_path, tiny_dir, tokenizer):
    """A stand-in worker repeats each prompt's last token: round one never closes the think (``\\n`` six times),
    so ``</think>`` is appended and round two repeats it; prompts go in batches of ``--vllm_batch``."""
    worker = tmp_path / "stand_in.py"
    worker.write_text(STAND_IN, encoding="utf-8")
    engine = VllmEngine(sys.executable, tiny_dir, worker=worker)
    questions = load_benchmark(MCQ_SAMPLE).questions[:3]
    try:
        tokens = vllm_token_engine(engine, tokenizer, Generation(do_sample=False), batch_size=2)
        replies = LocalReplier(tokenizer, tokens, max_think_tokens=6, max_answer_tokens=2).reply(questions, "think",
                                                                                                  None)
    finally:
        engine.close()
    assert [r["raw"] for r in replies] == ["\n" * 6 + "</think></think></think>"] * 3
    assert all(r["forced_think_end"] and r["finish_reason"] == "length" for r in replies)


@pytest.mark.e2e  # a console-script subprocess
def test_a_bad_questions_file_is_one_error_line(tmp_path, cache_root):
    bad = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "C"}])
    proc = subprocess.run([sys.executable, "-m", "medsft_lightning.cli", "eval", "medsft:tiny-qwen3", "--data",
                           str(bad), "--swanlab", "disabled"], capture_output=True, text=True, timeout=300,
                          env=offline_env(cache_root), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"medsft eval: error: {bad}:1: answer: C is not among the "
                                                    "options AB")
    assert "Traceback" not in proc.stderr


def test_the_figures_reach_swanlab_and_a_swanlab_failure_only_warns(run, tmp_path, monkeypatch, caplog):
    summary = json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    figures = eval_io.swanlab_figures(summary)
    tuned = next(r for r in summary["accuracy"] if r["model"] == "tuned" and r["scorer"] == "loglik"
                 and r["metric"] == "acc" and r["subject"] == "(all)")
    assert figures["eval/tuned/mcq-sample/loglik_acc"] == tuned["acc"]
    assert "thinking/base/no_think_switch/pass" in figures and "eval/tuned-base/mcq-sample/generate_acc" in figures
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    assert eval_io.log_swanlab(summary, "local", "medsft", tmp_path, "eval-test") == "local"
    (record,) = (tmp_path / "swanlog").glob("run-*/run-*.swanlab")
    assert b"eval/tuned/mcq-sample/loglik_acc" in record.read_bytes()  # SwanLab's own run file holds the keys
    monkeypatch.setenv("SWANLAB_MODE", "nonsense")  # SwanLab itself refuses it
    assert eval_io.log_swanlab(summary, "local", "medsft", tmp_path, "eval-test") == "failed"
    assert "the files in" in caplog.text


def test_served_models_are_asked_with_the_budget_and_each_thinking_mode(tmp_path):
    """``--endpoint``/``--base_endpoint`` (a fake OpenAI-compatible server): generate only (loglik is n/a for a chat
    endpoint), the thinking budget as ``thinking_token_budget``, ``enable_thinking`` off and ``/no_think`` in the
    user turn for the checks; the API key never reaches a file."""
    from tests.test_endpoint import KEY, FakeOpenAI

    fake = FakeOpenAI()
    fake.answer = ["\n\n", "Answer: ", "A"]
    try:
        out = tmp_path / "out"
        eval_command.main(["--endpoint", fake.url, "--base_endpoint", fake.url, "--limit", "3", "--think_checks", "2",
                           "--max_think_tokens", "5", "--max_answer_tokens", "7", "--api_key", KEY, "--output_dir",
                           str(out), "--swanlab", "disabled"])
    finally:
        fake.shutdown()
        fake.server_close()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "loglik: n/a for a served model" in summary["models"]["tuned"]["note"]
    assert {(r["scorer"], r["n"]) for r in summary["accuracy"] if r["subject"] == "(all)"} == {("generate", 3)}
    answers = _lines(out / "answers.jsonl")
    assert all(a["chosen"] == "A" and a["correct"] == (a["answer"] == "A") for a in answers)
    bodies = [r["body"] for r in fake.requests if r["body"]]
    assert len(bodies) == 2 * (3 + 2 + 2)
    thinking = [b for b in bodies if b["chat_template_kwargs"]["enable_thinking"]]
    assert all(b["max_tokens"] == 12 and b["thinking_token_budget"] == 5 for b in thinking)
    assert sum(b["messages"][-1]["content"].endswith(" /no_think") for b in thinking) == 4
    assert sum(not b["chat_template_kwargs"]["enable_thinking"] for b in bodies) == 4
    assert summary["thinking"]["tuned"]["think"]["n"] == 2
    assert not any(KEY in p.read_text(encoding="utf-8") for p in out.iterdir())
