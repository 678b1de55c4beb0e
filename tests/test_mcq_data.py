"""Multiple-choice benchmarks: every public layout read into medsft's schema, splits, subjects, bad files, names.

The files are written here in each release's own layout (field names, CSV headers, a ``.zip``, a parquet file,
a ModelScope-like snapshot folder); the questions are ours: several of these benchmarks are non-commercial.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest

from medsft_lightning import hub
from medsft_lightning.data.benchmarks import BENCHMARKS, MCQ_SAMPLE, load_benchmark
from medsft_lightning.data.mcq_files import read_mcq
from medsft_lightning.data.sources import DataError

Q = "A patient has a fever. Which drug lowers it?"
OPTIONS = {"A": "Paracetamol", "B": "Insulin", "C": "Heparin", "D": "Warfarin"}


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_layout_reads_into_the_same_question(tmp_path):
    """One question in each release's layout; all read as the same options and answer, the layout recognised."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {
        "mcq": _jsonl(tmp_path / "mcq.jsonl", [{"id": "q1", "question": Q, "options": OPTIONS, "answer": "A"}]),
        "cmb": tmp_path / "cmb.json",
        "cmexam": _csv(tmp_path / "cmexam.csv", ["Question", "Options", "Answer", "Medical Discipline"],
                       [[Q, "A Paracetamol\nB Insulin\nC Heparin\nD Warfarin", "A", "pharmacology"]]),
        "medqa": _jsonl(tmp_path / "medqa.jsonl", [{"question": Q, "options": OPTIONS, "answer": "Paracetamol",
                                                    "answer_idx": "A", "meta_info": "step1"}]),
        "medmcqa": tmp_path / "medmcqa.parquet",
        "ceval": _csv(tmp_path / "ceval" / "val" / "physician_val.csv", ["id", "question", "A", "B", "C", "D",
                                                                         "answer", "explanation"],
                      [[0, Q, *OPTIONS.values(), "A", ""]]),
        "cmmlu": _csv(tmp_path / "cmmlu" / "test" / "virology.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                      [[0, Q, *OPTIONS.values(), "A"]]),
        "choices": _jsonl(tmp_path / "choices.jsonl", [{"question": Q, "choices": [f"({k}) {v}" for k, v in
                                                                                   OPTIONS.items()], "answer": "A"}]),
    }
    files["cmb"].write_text(json.dumps([{"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "药理",
                                         "question": Q, "answer": "A", "question_type": "单项选择题",
                                         "option": {**OPTIONS, "E": ""}}], ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"id": "x1", "question": Q, "opa": "Paracetamol", "opb": "Insulin",
                                          "opc": "Heparin", "opd": "Warfarin", "cop": 0, "subject_name": "Pharm"},
                                         {"id": "x2", "question": Q, "opa": "Insulin", "opb": "Paracetamol",
                                          "opc": "Heparin", "opd": "Warfarin", "cop": 3, "subject_name": "Pharm"}]),
                   files["medmcqa"])
    for layout, path in files.items():
        got = read_mcq(path if layout not in ("ceval", "cmmlu") else path.parents[1], layout)
        assert got.layout == layout
        first = got.questions[0]
        assert (first["question"], first["options"], first["answer"]) == (Q, OPTIONS, "A"), layout
    subjects = {layout: read_mcq(p if layout not in ("ceval", "cmmlu") else p.parents[1], "x").questions[0]["subject"]
                for layout, p in files.items()}
    assert subjects == {"mcq": None, "cmb": "药理", "cmexam": "pharmacology", "medqa": "step1", "medmcqa": "Pharm",
                        "ceval": "physician", "cmmlu": "virology", "choices": None}
    assert read_mcq(files["medmcqa"], "m").questions[1]["answer"] == "D"  # cop counts from 0 in this release


def test_medmcqa_original_json_counts_from_one_and_ambiguous_files_are_refused(tmp_path):
    row = {"question": Q, "opa": "Paracetamol", "opb": "Insulin", "opc": "Heparin", "opd": "Warfarin"}
    one_based = _jsonl(tmp_path / "dev.json", [{**row, "cop": 1}, {**row, "cop": 4}])
    assert [q["answer"] for q in read_mcq(one_based, "m").questions] == ["A", "D"]
    unclear = _jsonl(tmp_path / "unclear.jsonl", [{**row, "cop": 1}, {**row, "cop": 2}])
    with pytest.raises(DataError, match=r"unclear.jsonl: cop: only values 1-3 occur"):
        read_mcq(unclear, "m")


def test_splits_subjects_and_zip_archives(tmp_path):
    """C-Eval as released (a zip of dev/val/test CSVs; test has no answers): the val split, medical subjects only."""
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    root = tmp_path / "release"
    for split in ("dev", "val", "test"):
        for subject in ("physician", "clinical_medicine", "law"):
            answer = "" if split == "test" else "B"
            _csv(root / split / f"{subject}_{split}.csv", header, [[i, f"{subject} {i}?", "w", "x", "y", "z", answer]
                                                                   for i in range(2)])
    archive = tmp_path / "ceval-exam.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in root.rglob("*.csv"):
            z.write(file, file.relative_to(root).as_posix())
    for source in (root, archive):
        got = load_benchmark(str(source))
        assert got.layout == "ceval" and len(got.questions) == 4
        assert {q["subject"] for q in got.questions} == {"physician", "clinical_medicine"}
        assert any("left out 6 file(s) of other splits" in n for n in got.notes)
        assert any("left out 2 of 1 other subject(s) (law); --subjects all keeps them" in n for n in got.notes)
    assert len(load_benchmark(str(root), subjects="all").questions) == 6
    assert {q["id"] for q in load_benchmark(str(root), split="dev").questions} >= {"dev/physician_dev/0"}
    with pytest.raises(DataError, match=r"_test.csv:2: answer: empty"):
        load_benchmark(str(root), split="test")


@pytest.mark.parametrize("rows, message", [
    ([{"question": Q, "options": OPTIONS, "answer": "E"}], r"bad.jsonl:1: answer: E is not among the options ABCD"),
    ([{"question": Q, "options": OPTIONS, "answer": "A"}, {"question": "", "options": OPTIONS, "answer": "A"}],
     r"bad.jsonl:2: question: missing or empty"),
    ([{"question": Q, "options": {"A": "x", "C": "y"}, "answer": "A"}],
     r"bad.jsonl:1: options: need 2 to 8 non-empty options lettered from A, got AC"),
    ([{"question": Q, "options": OPTIONS, "answer": "A", "id": 1}, {"question": Q, "options": OPTIONS, "answer": "B",
                                                                    "id": 1}], r"bad.jsonl:2: id: 1 appears twice"),
    ([{"question": Q, "options": OPTIONS, "answer": "?"}, {"question": Q, "options": OPTIONS, "answer": "Z"}],
     r"bad.jsonl:1: answer: not option letters: \? \(and 1 more problem\(s\)\)$"),
    ([{"prompt": Q}], r"bad.jsonl:1: fields: no known layout has these fields \(prompt\)"),
])
def test_a_bad_file_is_one_line_naming_file_line_and_field(tmp_path, rows, message):
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as err:
        load_benchmark(str(bad))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_the_packaged_sample_is_ours_and_both_languages(tmp_path):
    sample = load_benchmark(MCQ_SAMPLE)
    assert sample.name == "mcq-sample" and len(sample.questions) == 24
    assert sum(q["id"].startswith("zh") for q in sample.questions) == 12
    assert sum(len(q["answer"]) > 1 for q in sample.questions) == 5


def test_a_named_benchmark_is_downloaded_from_modelscope_by_its_registry_id(tmp_path, monkeypatch):
    """``cmmlu-medical``: the substituted downloader gets OpenCompass's id and returns a snapshot-like folder (hub
    metadata, a README, dev/test CSVs); its medical subjects are read from the test split."""
    snapshot = tmp_path / "snapshot"
    (snapshot / "configuration.json").parent.mkdir(parents=True)
    (snapshot / "configuration.json").write_text('{"framework": "other"}', encoding="utf-8")
    (snapshot / "README.md").write_text("# CMMLU", encoding="utf-8")
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    for split in ("dev", "test"):
        for subject in ("anatomy", "arts"):
            _csv(snapshot / split / f"{subject}.csv", header, [[0, f"{subject}?", "a", "b", "c", "d", "C"]])
    asked = []
    monkeypatch.setattr(hub, "download_dataset", lambda dataset_id, revision, cache_dir: asked.append(dataset_id)
                        or str(snapshot))
    got = load_benchmark("cmmlu-medical", cache_dir=str(tmp_path / "cache"))
    assert asked == [BENCHMARKS["cmmlu-medical"].modelscope_id] == ["opencompass/cmmlu"]
    assert [(q["subject"], q["answer"]) for q in got.questions] == [("anatomy", "C")]
    with pytest.raises(FileNotFoundError, match="not a benchmark name"):
        load_benchmark("no-such-benchmark")
