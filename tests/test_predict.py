"""medsft predict: input order, fields, and exact resume after SIGKILL (also mid-write)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from medsft_lightning.data.questions import read_questions
from medsft_lightning.data.sources import DataError
from medsft_lightning.generation.generate import Generation
from medsft_lightning.generation.predict import AnswerWriter, read_answers
from tests.conftest import offline_env, write_jsonl

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [{"id": f"q{i:02d}", "question": f"患者{i}岁，发热{i % 4 + 1}天，应该怎么办？" + "请详细说明。" * (i % 5)}
             for i in range(13)]


def predict_cmd(model_dir: Path, questions: Path, out: Path, batch_size: int = 4) -> list[str]:
    return [sys.executable, "-c", "from medsft_lightning.cli import cli_main; cli_main()", "predict",
            "--config", str(REPO / "configs" / "demo.yaml"), "--model.model_name_or_path", str(model_dir),
            "--data.predict_dataset", str(questions), "--predict_writer.output_path", str(out),
            "--data.batch_size", str(batch_size), "--model.generation.max_new_tokens", "12",
            "--trainer.logger", "false"]


def test_read_questions_checks_rows(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a"}\n{"question": ""}\nnot json\n{"id": 0, "question": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_questions(path)
    msg = str(err.value)
    assert f"{path}:2: question: missing, empty or not a string" in msg
    assert f"{path}:3: invalid JSON" in msg
    assert f"{path}:4: id: 0 appears twice" in msg  # the first row's default id is its position, 0
    write_jsonl(path, [{"question": "a", "system": "S"}, {"id": "x", "question": "b"}])
    assert read_questions(path) == [{"id": 0, "question": "a", "system": "S"}, {"id": "x", "question": "b"}]


def test_read_answers_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "ans')
    assert read_answers(path) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'


def test_end_of_predict_log_counts_answers_stopped_at_max_new_tokens(tmp_path, caplog):
    answers = [{"id": i, "finish_reason": "length" if i in (1, 4, 7, 9) else "stop"} for i in reversed(range(13))]
    out = write_jsonl(tmp_path / "answers.jsonl", answers)
    trainer = SimpleNamespace(strategy=SimpleNamespace(barrier=lambda name: None), is_global_zero=True,
                              datamodule=SimpleNamespace(predict_rows=[{"id": i} for i in range(13)]))
    with caplog.at_level(logging.INFO, logger="medsft_lightning.generation.predict"):
        AnswerWriter(str(out)).on_predict_end(trainer, SimpleNamespace(generation=Generation(max_new_tokens=12)))
    assert (f"[predict] wrote 13 answer(s) to {out}; 4 of 13 (31%) stopped at max_new_tokens=12 (finish_reason: "
            "length): raise --model.generation.max_new_tokens") in caplog.text
    assert [a["id"] for a in read_answers(out)] == list(range(13))  # rewritten in input order
    write_jsonl(out, [{"id": 0, "finish_reason": "stop"}])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medsft_lightning.generation.predict"):
        AnswerWriter(str(out)).on_predict_end(trainer, SimpleNamespace(generation=Generation(max_new_tokens=12)))
    assert f"wrote 1 answer(s) to {out}; none stopped at max_new_tokens=12" in caplog.text


@pytest.mark.e2e
def test_predict_writes_every_question_once_in_input_order(tmp_path, tiny_dir, cache_root):
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run(predict_cmd(tiny_dir, questions, out), cwd=tmp_path, env=offline_env(cache_root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in lines] == [q["id"] for q in QUESTIONS]
    assert [a["question"] for a in lines] == [q["question"] for q in QUESTIONS]
    for a in lines:
        assert set(a) == {"id", "question", "think", "answer", "raw", "finish_reason", "num_generated_tokens"}
        assert a["finish_reason"] in {"stop", "length"} and 1 <= a["num_generated_tokens"] <= 12
    # the tiny model's config sets no sampling values: Qwen3's; the log counts the answers cut off at 12 tokens
    decoding = "[predict] decoding: sampling (temperature 0.6, top_p 0.95, top_k 20, seed 0), max_new_tokens 12"
    assert decoding in proc.stderr
    cut = sum(a["finish_reason"] == "length" for a in lines)
    expected = f"{cut} of 13 ({100 * cut / 13:.0f}%) stopped at max_new_tokens=12 (finish_reason: length)"
    assert (expected if cut else "none stopped at max_new_tokens=12") in proc.stderr


@pytest.mark.e2e
def test_predict_resumes_after_sigkill_and_torn_write(tmp_path, tiny_dir, cache_root):
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    out = tmp_path / "answers.jsonl"
    env = offline_env(cache_root)
    proc = subprocess.Popen(predict_cmd(tiny_dir, questions, out, batch_size=1), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().splitlines()
    assert 3 <= len(written) < 13, "the kill must land mid-run"
    with out.open("ab") as f:  # what a kill during a write leaves: half a line
        f.write(b'{"id": "q99", "question": "torn')
    rerun = subprocess.run(predict_cmd(tiny_dir, questions, out, batch_size=1), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in lines] == [q["id"] for q in QUESTIONS]  # exactly 13, none twice, input order


@pytest.mark.e2e
def test_predict_on_two_processes_writes_every_question_once_in_order(tmp_path, tiny_dir, cache_root):
    medsft = Path(sys.executable).parent / "medsft"  # the console script: DDP re-launches it per rank
    if not medsft.exists():
        pytest.skip("needs the installed medsft console script")
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    out = tmp_path / "answers.jsonl"
    cmd = [str(medsft), *predict_cmd(tiny_dir, questions, out, batch_size=4)[3:], "--trainer.strategy", "ddp",
           "--trainer.devices", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(cache_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in lines] == [q["id"] for q in QUESTIONS]  # 13 lines, input order, none twice
    assert not list(tmp_path.glob("answers.jsonl.rank*"))  # the second process's part was merged
