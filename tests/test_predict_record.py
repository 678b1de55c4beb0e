"""medsft predict resumes only its own answers: the record beside the answers file (model, decoding, questions),
the one-line refusal when another run wrote them, ``--predict_writer.overwrite``, and an exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from medsft_lightning.cli import cli_main
from medsft_lightning.generation.answer_record import (
    differences,
    file_fingerprint,
    make_record,
    record_path,
    weights_fingerprint,
)
from medsft_lightning.generation.predict import AnswersOfAnotherRun, AnswerWriter, read_answers
from tests.conftest import write_jsonl
from tests.test_predict import QUESTIONS, predict_cmd

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore:Total length of")
GREEDY = ["--model.generation.do_sample", "false", "--data.batch_size", "1"]


@pytest.fixture(scope="module")
def retrained_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model after "training": a copy whose every weight moved by 1e-3 (same names, shapes, size)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("retrained") / "hf_model"
    shutil.copytree(tiny_dir, out)
    weights = load_file(tiny_dir / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def predict(model: Path, questions: Path, out: Path, *flags: str) -> None:
    """``medsft predict`` in this process (greedy, one question a batch, 4 new tokens)."""
    cli_main(predict_cmd(model, questions, out)[3:] + GREEDY + ["--model.generation.max_new_tokens", "4", *flags])


def refusal(model: Path, questions: Path, out: Path, *flags: str) -> str:
    before = out.read_bytes()
    with pytest.raises(SystemExit) as err:
        predict(model, questions, out, *flags)
    assert out.read_bytes() == before  # nothing appended, nothing dropped
    text = str(err.value.code)
    assert text.startswith("medsft: error: ") and "\n" not in text
    assert "--predict_writer.output_path" in text and "--predict_writer.overwrite true" in text
    return text


# -- fingerprints ---------------------------------------------------------------------------------
def test_fingerprint_of_a_large_shard_reads_a_few_mib_and_looks_at_every_tensor(tmp_path):
    """A 3.4 GB shard (sparse here) is fingerprinted by reading ~0.1 MiB, and a change to its one small tensor (a
    norm-only fine-tune) is seen: every tensor is sampled, not the file at evenly spaced places."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("needs /proc/self/io (Linux) to count the bytes read")
    big, small = 3_400_000_000, 8192
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "model.embed_tokens.weight": {"dtype": "BF16", "shape": [big // 2], "data_offsets": [0, big]},
                         "model.norm.weight": {"dtype": "BF16", "shape": [small // 2],
                                               "data_offsets": [big, big + small]}}).encode()
    shard = tmp_path / "model-00001-of-00002.safetensors"
    with shard.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + big + small)

    def rchar() -> int:
        return int(next(line.split()[1] for line in io.read_text().splitlines() if line.startswith("rchar")))

    start = rchar()
    first = file_fingerprint(shard)
    read = rchar() - start
    assert read < 2**20, f"read {read} bytes"
    with shard.open("r+b") as f:
        f.seek(8 + len(header) + big + small // 2)
        f.write(b"\x01\x3f")
    assert file_fingerprint(shard) != first


def test_weights_fingerprint_tells_a_retrained_model_apart_and_ignores_what_is_not_the_model(
        tiny_dir, retrained_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    assert (tiny_dir / "model.safetensors").stat().st_size > 4 * 2**20  # the sampled path, as for a real model
    base = weights_fingerprint(tiny_dir)
    assert weights_fingerprint(retrained_dir) != base
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    assert weights_fingerprint(copy) == base  # content, not place or time
    write_jsonl(copy / "answers.jsonl", [{"id": 0}])  # answers kept beside the model do not change it
    record_path(copy / "answers.jsonl").write_text("{}", encoding="utf-8")
    (copy / "README.md").write_text("notes", encoding="utf-8")
    assert weights_fingerprint(copy) == base
    weights = load_file(copy / "model.safetensors")  # LoRA merged into the query projections only
    save_file({k: v + 1e-3 if "q_proj" in k else v for k, v in weights.items()}, copy / "model.safetensors",
              metadata={"format": "pt"})
    assert weights_fingerprint(copy) != base
    ckpt = tmp_path / "last.ckpt"  # a checkpoint: every stored tensor counts (torch.save's CRC-32 of each)
    state = {"state_dict": {"w": torch.zeros(2**21), "b": torch.zeros(8)}, "epoch": 1}
    torch.save(state, ckpt)
    before = weights_fingerprint(ckpt)
    state["state_dict"]["w"][12345] = 1e-6
    torch.save(state, ckpt)
    assert ckpt.stat().st_size > 4 * 2**20 and weights_fingerprint(ckpt) != before


def test_differences_name_each_changed_field_and_question():
    old = make_record({"source": "A", "weights": "1"}, {"engine": "hf", "max_new_tokens": 4},
                      [(0, [1, 2]), ("1", [3]), (2, [4])])
    assert differences(old, old, [0, "1", 2]) == []
    new = make_record({"source": "B", "weights": "2"}, {"engine": "hf", "max_new_tokens": 5},
                      [(0, [1, 2]), (1, [3]), (2, [9])])
    assert differences(old, new, [0, "1", 2]) == [
        'model.source "A" then, "B" now', 'model.weights "1" then, "2" now',
        "decoding.max_new_tokens 4 then, 5 now",
        "1 answered question(s) with another prompt now (question text, system prompt or chat template): 2",
        '1 answered question(s) not among the questions now: "1"',  # the id "1" is not the id 1
    ]
    assert differences(old, new, [0]) == differences(old, new, [])[:3]  # only answered questions count


# -- the writer -----------------------------------------------------------------------------------
def writer_trainer(skip: set | None = None):
    return SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(predict_skip_ids=skip))


def test_answers_without_a_record_are_refused_unless_overwritten(tmp_path):
    out = write_jsonl(tmp_path / "answers.jsonl", [{"id": 0}, {"id": 1}])  # written before records existed
    part = write_jsonl(tmp_path / "answers.jsonl.rank1", [{"id": 2}])
    trainer = writer_trainer()
    with pytest.raises(AnswersOfAnotherRun) as err:
        AnswerWriter(str(out)).setup(trainer, None, "predict")
    text = str(err.value)
    assert "\n" not in text and f"{out} holds 3 answer(s) but no record answers.jsonl.meta.json" in text
    assert "--predict_writer.output_path" in text and "--predict_writer.overwrite true" in text
    record_path(out).write_text("{}", encoding="utf-8")
    AnswerWriter(str(out), overwrite=True).setup(trainer, None, "predict")
    assert trainer.datamodule.predict_skip_ids == set()
    assert not out.exists() and not part.exists() and not record_path(out).exists()


# -- medsft predict, in this process ----------------------------------------------------------------
@pytest.fixture(scope="module")
def answered(tiny_dir, cache_root, tmp_path_factory):
    """The tiny model's greedy answers to 3 questions, written uninterrupted: ``(questions, answers file)``."""
    work = tmp_path_factory.mktemp("answered")
    questions = write_jsonl(work / "questions.jsonl", QUESTIONS[:3])
    predict(tiny_dir, questions, work / "answers.jsonl")
    return questions, work / "answers.jsonl"


def copy_answers(answered, tmp_path: Path, keep: int | None = None) -> Path:
    """The answers file and its record in ``tmp_path``; ``keep``: only its first lines (a run killed there)."""
    out = tmp_path / "answers.jsonl"
    lines = answered[1].read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:keep]), encoding="utf-8")
    if record_path(answered[1]).exists():
        shutil.copy(record_path(answered[1]), record_path(out))
    return out


def test_a_killed_run_resumes_exactly_with_the_same_model(answered, tiny_dir, tmp_path, caplog):
    questions, full = answered
    out = copy_answers(answered, tmp_path, keep=1)
    with caplog.at_level("INFO"):
        predict(tiny_dir, questions, out)
    assert "already holds 1 answer(s) of this model, decoding settings and questions" in caplog.text
    assert out.read_bytes() == full.read_bytes()  # the uninterrupted run's answers, byte for byte
    more = write_jsonl(tmp_path / "more.jsonl", QUESTIONS[:4])  # a question added to the file: only it is answered
    predict(tiny_dir, more, out)
    assert out.read_text(encoding="utf-8").startswith(full.read_text(encoding="utf-8"))
    assert [a["id"] for a in read_answers(out)] == ["q00", "q01", "q02", "q03"]


def test_another_model_is_refused(answered, retrained_dir, tmp_path):
    """The issue's case: the base model's answers are in the file, the fine-tuned model is asked next."""
    questions, _ = answered
    out = copy_answers(answered, tmp_path)  # finished: every question answered, no predict loop runs
    text = refusal(retrained_dir, questions, out)
    assert f"{out} holds 3 answer(s) of another run" in text
    assert "model.source" in text and str(retrained_dir) in text and "model.weights" in text


def test_other_decoding_settings_or_questions_are_refused(answered, tiny_dir, tmp_path):
    out = copy_answers(answered, tmp_path, keep=2)  # killed after q00 and q01: the predict loop starts
    edited = write_jsonl(tmp_path / "edited.jsonl", [{**QUESTIONS[1], "question": "Cough?"}, QUESTIONS[2]])
    text = refusal(tiny_dir, edited, out, "--model.generation.max_new_tokens", "5")
    assert f"{out} holds 2 answer(s) of another run (decoding.max_new_tokens 4 then, 5 now; 1 answered " \
           'question(s) with another prompt now (question text, system prompt or chat template): "q01"; 1 answered ' \
           'question(s) not among the questions now: "q00"): pass another --predict_writer.output_path' in text


def test_overwrite_answers_with_the_new_model(answered, retrained_dir, tmp_path, caplog):
    questions, _ = answered
    out = copy_answers(answered, tmp_path)
    with caplog.at_level("INFO"):
        predict(retrained_dir, questions, out, "--predict_writer.overwrite", "true")
    assert f"discarded 3 answer(s) in {out}" in caplog.text
    assert [a["id"] for a in read_answers(out)] == ["q00", "q01", "q02"]
    record = json.loads(record_path(out).read_text(encoding="utf-8"))
    assert record["model"]["source"] == str(retrained_dir)
    assert record["model"]["weights"] == weights_fingerprint(retrained_dir)
