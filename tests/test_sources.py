import json

import pytest

from medsft_lightning.sources import DataError, data_files, fingerprint, read_rows, split_indices
from tests.conftest import make_rows, write_jsonl


def test_split_is_deterministic_90_10():
    train, val = split_indices(100, 0.1, 42)
    assert (len(train), len(val)) == (90, 10)
    assert split_indices(100, 0.1, 42) == (train, val)
    assert split_indices(100, 0.1, 43)[1] != val
    assert sorted(train + val) == list(range(100))


def test_fingerprint_changes_with_content():
    rows = make_rows(3)
    assert fingerprint(rows) == fingerprint([dict(r) for r in rows])
    assert fingerprint(rows) != fingerprint(rows[:2])
    assert len(fingerprint(rows)) == 12


def test_reads_jsonl_json_and_folders(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_rows(2))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps(make_rows(3)), encoding="utf-8")
    files = data_files(tmp_path)
    assert [f.name for f in files] == ["a.jsonl", "b.json"]
    got = read_rows(files)
    assert len(got.rows) == 5 and not got.problems
    assert set(got.rows[0]) == {"question", "think", "answer"}  # other columns ignored
    assert got.where[1] == f"{tmp_path / 'a.jsonl'}:2"


def test_every_problem_is_reported_with_file_line_and_field(tmp_path):
    good = make_rows(1)[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join([
            json.dumps(good),
            "{not json",
            json.dumps({**good, "question": ""}),
            json.dumps({k: v for k, v in good.items() if k != "answer"}),
            json.dumps({**good, "think": 3}),
        ]) + "\n",
        encoding="utf-8",
    )
    rows = read_rows([path])
    assert rows.problems == [
        f"{path}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{path}:3: question: empty",
        f"{path}:4: answer: missing",
        f"{path}:5: think: expected a string, got int",
    ]
    with pytest.raises(DataError, match=r"(?s)4 problem\(s\).*on_bad_rows=skip"):
        rows.raise_if_problems(str(path))
    skipped = read_rows([path], skip_bad=True)
    assert (len(skipped.rows), skipped.skipped, skipped.problems) == (1, 4, [])


def test_json_array_rows_are_named_by_their_index_in_their_own_file(tmp_path):
    good = make_rows(3)
    write_jsonl(tmp_path / "a.jsonl", good[:2])
    (tmp_path / "b.json").write_text(json.dumps([good[2], {**good[0], "question": 1}]), encoding="utf-8")
    rows = read_rows(data_files(tmp_path))
    assert rows.where == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2", f"{tmp_path / 'b.json'}[0]"]
    assert rows.problems == [f"{tmp_path / 'b.json'}[1]: question: expected a string, got int"]
