"""Every data check before training: one broken file per kind, its documented error or counted skip."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.data.encoding import encode_rows, token_lengths
from medsft_lightning.data.sources import DataError, read_rows
from tests.conftest import make_rows, offline_env, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def lines(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]


def module(tmp_path, tiny_dir, data, **kwargs) -> MedicalDataModule:
    kwargs = {"val_dataset": str(data), "max_length": 512, "batch_size": 2, **kwargs}
    return MedicalDataModule(dataset=str(data), tokenizer=str(tiny_dir), cache_dir=str(tmp_path / "cache"), **kwargs)


# -- reading: BOM, line endings, encoding --------------------------------------------------------------
def test_bom_is_ignored_and_noted_even_mid_file(tmp_path):
    a, b, c = lines(make_rows(3))
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + a + b"\n" + b + b"\n\xef\xbb\xbf" + c + b"\n")  # two files concatenated
    rows = read_rows([path])
    assert [r["question"] for r in rows.rows] == [r["question"] for r in make_rows(3)]
    assert rows.problems == [] and rows.counts["boms_ignored"] == 2
    assert rows.notices == [("boms_ignored", f"{path}:1: UTF-8 byte-order mark (BOM) ignored"),
                            ("boms_ignored", f"{path}:3: UTF-8 byte-order mark (BOM) ignored")]


def test_mixed_line_endings_are_noted_and_no_line_separator_reaches_a_field(tmp_path):
    rows = make_rows(4)
    rows[1]["think"] = "first\u2028second\u0085third\u2029"  # JSON may hold these raw; str.splitlines cuts there
    a, b, c, d = lines(rows)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(a + b"\r\n" + b + b"\n" + c + b"\r" + d + b"\n")
    got = read_rows([path])
    assert got.problems == [] and [r["think"] for r in got.rows] == [r["think"] for r in rows]
    assert not any("\r" in v for r in got.rows for v in r.values())
    assert got.where == [f"{path}:{n}" for n in (1, 2, 3, 4)]
    assert got.notices == [("mixed_line_ending_files",
                            f"{path}: mixed line endings (2 LF, 1 CRLF, 1 CR); every row read as usual")]
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(a + b"\r\n" + b + b"\r\n")
    assert read_rows([crlf]).notices == []  # one style, even CRLF, is not a notice


def test_non_utf8_line_names_file_line_and_byte_offset(tmp_path):
    a, b, c = lines(make_rows(3))
    bad = b.replace(b"headache", "headaché".encode("latin-1"))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(a + b"\n" + bad + b"\n" + c + b"\n")
    offset = len(a) + 1 + bad.index(b"\xe9")
    rows = read_rows([path])
    assert rows.problems == [f"{path}:2: encoding: not UTF-8 (invalid continuation byte: byte 0xe9 at byte offset "
                             f"{offset} of the file); save the file as UTF-8"]
    assert len(rows.rows) == 2  # the other lines are read
    skipped = read_rows([path], skip_bad=True)
    assert (len(skipped.rows), skipped.skipped, skipped.problems) == (2, 1, [])


# -- the DataModule: one error with every problem, or counted skips -----------------------------------
def broken_corpus(folder) -> None:
    """One file per kind of bad row, each also holding good rows: 8 bad rows (9 problems), 8 good rows."""
    good = make_rows(12)
    folder.mkdir()
    (folder / "a_invalid_json.jsonl").write_bytes(b"\n".join([*lines(good[0:2]), b"{not json"]) + b"\n")
    (folder / "b_missing.jsonl").write_bytes(b"\n".join(lines([good[2], {"question": "Q?"}])) + b"\n")
    (folder / "c_types.jsonl").write_bytes(b"\n".join(lines([good[3], {**good[4], "think": None}, [1, 2]])) + b"\n")
    (folder / "d_empty.jsonl").write_bytes(b"\n".join(lines([{**good[5], "question": " "}, {**good[6], "answer": ""},
                                                              *good[7:9]])) + b"\n")
    (folder / "e_not_utf8.jsonl").write_bytes(lines(good[9:10])[0] + b"\n\xff\xfe{}\n")
    (folder / "f_array.json").write_text(json.dumps([good[10], {**good[11], "answer": 5}]), encoding="utf-8")


def test_every_bad_row_is_listed_in_one_error(tmp_path, tiny_dir):
    data = tmp_path / "corpus"
    broken_corpus(data)
    dm = module(tmp_path, tiny_dir, data, val_dataset=None, val_fraction=0.2)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert str(err.value).splitlines() == [
        f"9 problem(s) in {data}:",
        f"  {data}/a_invalid_json.jsonl:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"  {data}/b_missing.jsonl:2: think: missing",
        f"  {data}/b_missing.jsonl:2: answer: missing",
        f"  {data}/c_types.jsonl:2: think: expected a string, got NoneType",
        f"  {data}/c_types.jsonl:3: row: expected a JSON object, got list",
        f"  {data}/d_empty.jsonl:1: question: empty",
        f"  {data}/d_empty.jsonl:2: answer: empty",
        f"  {data}/e_not_utf8.jsonl:2: encoding: not UTF-8 (invalid start byte: byte 0xff at byte offset "
        f"{len(lines(make_rows(10)[9:10])[0]) + 1} of the file); save the file as UTF-8",
        f"  {data}/f_array.json[1]: answer: expected a string, got int",
        "Fix the rows, or set data.on_bad_rows=skip to skip and count them.",
    ]
    skip = module(tmp_path, tiny_dir, data, val_dataset=None, val_fraction=0.2, on_bad_rows="skip")
    skip.setup("fit")
    assert (skip.stats["bad_rows_skipped"], skip.stats["train_rows"], skip.stats["val_rows"]) == (8, 6, 2)


def test_empty_think_keep_drop_error(tmp_path, tiny_dir):
    rows = make_rows(8)
    for i in (2, 5):
        rows[i]["think"] = "  \n"
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    keep = module(tmp_path, tiny_dir, data)
    keep.setup("fit")
    assert (keep.stats["empty_think_rows"], keep.stats["empty_think_dropped"], keep.stats["train_rows"]) == (4, 0, 8)
    drop = module(tmp_path, tiny_dir, data, empty_think="drop")
    drop.setup("fit")
    assert (drop.stats["empty_think_rows"], drop.stats["empty_think_dropped"], drop.stats["train_rows"]) == (4, 4, 6)
    with pytest.raises(DataError, match=r"4 problem\(s\)") as err:
        module(tmp_path, tiny_dir, data, empty_think="error").setup("fit")
    assert f"{data}:3: think: empty (data.empty_think=error)" in str(err.value)
    assert f"{data}:6: think: empty (data.empty_think=error)" in str(err.value)
    skip = module(tmp_path, tiny_dir, data, empty_think="error", on_bad_rows="skip")
    skip.setup("fit")
    assert (skip.stats["bad_rows_skipped"], skip.stats["train_rows"], skip.stats["val_rows"]) == (4, 6, 6)


def test_duplicate_questions_within_a_source_and_across_train_val(tmp_path, tiny_dir):
    rows = make_rows(10)
    rows[4]["question"] = "  " + rows[1]["question"] + "\n"  # same text after strip
    rows[7]["question"] = rows[1]["question"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [make_rows(12)[11], {**make_rows(1)[0], "question": rows[3]["question"]}])
    keep = module(tmp_path, tiny_dir, train, val_dataset=str(val))
    keep.setup("fit")
    assert (keep.stats["duplicate_questions"], keep.stats["val_questions_in_train"]) == (2, 1)
    assert (keep.stats["train_rows"], keep.stats["val_rows"], keep.stats["duplicates_dropped"]) == (10, 2, 0)
    assert [n for _, n in keep.train_rows.notices] == [f"{train}:5: question: same as {train}:2",
                                                       f"{train}:8: question: same as {train}:2"]
    drop = module(tmp_path, tiny_dir, train, val_dataset=str(val), duplicates="drop")
    drop.setup("fit")
    assert (drop.stats["train_rows"], drop.stats["val_rows"], drop.stats["duplicates_dropped"]) == (8, 1, 3)
    with pytest.raises(DataError) as err:
        module(tmp_path, tiny_dir, train, val_dataset=str(val), duplicates="error").setup("fit")
    assert str(err.value).splitlines()[:4] == [
        f"3 problem(s) in {train} and {val}:",
        f"  {train}:5: question: same as {train}:2 (data.duplicates=error)",
        f"  {train}:8: question: same as {train}:2 (data.duplicates=error)",
        f"  {val}:2: question: same as training row {train}:4 (data.duplicates=error)",
    ]
    # With a random split, kept duplicates may straddle it: counted (seed 2 puts one of the three in val).
    split = module(tmp_path, tiny_dir, train, val_dataset=None, val_fraction=0.3, split_seed=2)
    split.setup("fit")
    straddling = {q.strip() for q in (r["question"] for r in split.val_rows.rows)}
    straddling &= {r["question"].strip() for r in split.train_rows.rows}
    assert split.stats["val_questions_in_train"] == sum(r["question"].strip() in straddling
                                                         for r in split.val_rows.rows) == 1


def test_too_long_truncate_drop_error(tmp_path, tiny_dir, tokenizer):
    rows = make_rows(8)
    for i in (1, 6):
        rows[i]["answer"] = "Rest and fluids. " * 30
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    lengths = token_lengths(rows, tokenizer, system_prompt=MedicalDataModule().hparams.system_prompt)
    assert sorted(lengths)[-3] < 100 < sorted(lengths)[-2]
    trunc = module(tmp_path, tiny_dir, data, max_length=100)
    trunc.setup("fit")
    assert (trunc.stats["train_too_long"], trunc.stats["train_truncated"], trunc.stats["train_rows"]) == (2, 2, 8)
    assert max(len(r["input_ids"]) for r in trunc.train_set.rows) == 100
    assert sorted(r["length"] for r in trunc.train_set.rows) == sorted(lengths)
    drop = module(tmp_path, tiny_dir, data, max_length=100, too_long="drop")
    drop.setup("fit")
    assert (drop.stats["train_too_long"], drop.stats["train_dropped_too_long"], drop.stats["train_rows"]) == (2, 2, 6)
    assert drop.stats["train_truncated"] == 0
    with pytest.raises(DataError) as err:
        module(tmp_path, tiny_dir, data, max_length=100, too_long="error").setup("fit")
    assert str(err.value).splitlines()[1:3] == [
        f"  {data}:2: {lengths[1]} tokens > max_length 100 (data.too_long=error)",
        f"  {data}:7: {lengths[6]} tokens > max_length 100 (data.too_long=error)",
    ]
    skip = module(tmp_path, tiny_dir, data, max_length=100, too_long="error", on_bad_rows="skip")
    skip.setup("fit")
    # dataset and val_dataset are the same file here: each read skips its 2 long rows
    assert (skip.stats["too_long_skipped"], skip.stats["bad_rows_skipped"], skip.stats["train_rows"]) == (4, 4, 6)


def test_encode_rows_reports_the_untruncated_length(tokenizer):
    row = {"question": "Q?", "think": "T", "answer": "A."}
    (full,) = encode_rows([row], tokenizer, system_prompt="S", max_length=100)
    (cut,) = encode_rows([row], tokenizer, system_prompt="S", max_length=20)
    assert (full["length"], cut["length"], len(cut["input_ids"])) == (26, 26, 20)
    assert token_lengths([row], tokenizer, system_prompt="S") == [26]


def test_fewer_rows_than_one_batch(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(5))
    with pytest.raises(DataError) as err:
        module(tmp_path, tiny_dir, data, batch_size=8).setup("fit")
    assert str(err.value) == ("5 training row(s) left after the checks, fewer than one batch: data.batch_size=8 x "
                              "1 device(s) = 8; add rows, or lower --data.batch_size")
    dm = module(tmp_path, tiny_dir, data, batch_size=3)
    dm.trainer = SimpleNamespace(world_size=2, loggers=[])
    with pytest.raises(DataError, match=r"data.batch_size=3 x 2 device\(s\) = 6; .* or --trainer.devices$"):
        dm.setup("fit")
    module(tmp_path, tiny_dir, data, batch_size=5).setup("fit")  # exactly one batch is enough


def test_stats_are_logged_and_saved_with_the_run_hyperparameters(tmp_path, tiny_dir, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    logged: list[str] = []
    monkeypatch.setattr("medsft_lightning.data.datamodule.rank_zero_info", logged.append)
    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(6))
    dm = module(tmp_path, tiny_dir, data)
    dm.trainer = SimpleNamespace(world_size=1, loggers=[CSVLogger(tmp_path / "runs", name="demo")])
    dm.setup("fit")
    dm.setup("validate")  # a second setup (validate, then fit) neither re-reads nor re-logs
    saved = yaml.safe_load((tmp_path / "runs" / "demo" / "version_0" / "hparams.yaml").read_text())
    assert saved["data_stats"] == dm.stats and dm.stats["train_rows"] == 6
    assert [m for m in logged if m.startswith("[data] stats: ")] == [
        "[data] stats: " + ", ".join(f"{k}={v}" for k, v in dm.stats.items())]
    assert dm.stats["val_questions_in_train"] == 6  # val_dataset is the training file itself


@pytest.mark.e2e  # a console-script subprocess
# -- medsft preview -------------------------------------------------------------------------------------
def test_preview_shows_the_label_mask_and_length_statistics(tmp_path, cache_root, tokenizer):
    from medsft_lightning import hub
    from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT, prompt_messages
    from medsft_lightning.data.sources import split_indices
    cmd = [sys.executable, "-c", "from medsft_lightning.cli import cli_main; cli_main()", "preview", "--config",
           str(REPO / "configs" / "demo.yaml"), "--data.max_length", "300", "--row", "2", "--color", "always"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(cache_root), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    sample = read_rows([hub.sample_dataset_path()]).rows
    train_idx, _ = split_indices(len(sample), 0.1, 42)
    row = sample[train_idx[2]]
    prompt = len(tokenizer.apply_chat_template(prompt_messages(row, DEFAULT_SYSTEM_PROMPT), tokenize=True,
                                               add_generation_prompt=True)["input_ids"])
    assert f"== train row 2 of 86 ({hub.sample_dataset_path()}:{train_idx[2] + 1})" in out
    assert f"tokens: {prompt} prompt tokens (masked), " in out
    dim, green, reset = "\033[2m", "\033[32m", "\033[0m"
    assert f"{dim}[masked]<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n" in out
    assert f"<|im_start|>assistant\n[/masked]{reset}{green}[train]<think>\n" in out
    row_is_cut = len(tokenizer.apply_chat_template(
        [*prompt_messages(row, DEFAULT_SYSTEM_PROMPT), {"role": "assistant", "content": row["answer"],
                                                        "reasoning_content": row["think"]}])) > 300
    assert out.count("[train]") == 1 and out.count("[masked]") == (1 if row_is_cut else 2)
    lengths = token_lengths(sample, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    train = sorted(lengths[i] for i in train_idx)
    assert (f"train: 86 rows | tokens per row before truncation: min {train[0]}, median "
            f"{statistics.median(train):g}, p90 {train[77]}, p99 {train[85]}, max {train[-1]}") in out
    over = sum(n > 300 for n in train)
    assert f"  longer than max_length=300: {over} ({over} truncated, 0 dropped, 0 dropped with nothing" in out
    assert "== checks: bad_rows_skipped=0, boms_ignored=0, mixed_line_ending_files=0" in out
