import json

import pytest

from medsft_lightning.data.sources import DataError, fingerprint, read_rows, select_data_files, split_indices
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
    files = select_data_files(tmp_path).files
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
    rows = read_rows(select_data_files(tmp_path).files)
    assert rows.where == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:2", f"{tmp_path / 'b.json'}[0]"]
    assert rows.problems == [f"{tmp_path / 'b.json'}[1]: question: expected a string, got int"]


def fake_snapshot(folder, n_rows: int = 5):
    """A ModelScope dataset snapshot as `krisfu/delicate_medical_r1_data` has it: rows beside hub metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "r1_data_example.jsonl", make_rows(n_rows))
    (folder / "dataset_infos.json").write_text(json.dumps(
        {"default": {"features": {"question": {"dtype": "string"}}, "splits": {"train": {"num_examples": n_rows}}}}))
    (folder / "configuration.json").write_text(json.dumps({"framework": "other", "task": "text-generation"}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# delicate medical r1 data\n")
    (folder / ".gitattributes").write_text("*.jsonl filter=lfs diff=lfs merge=lfs -text\n")
    for hidden in (".mdl", ".msc", ".mv"):  # ModelScope's own cache state
        (folder / hidden).write_bytes(b"\x80\x04binary")
    (folder / "._____temp").mkdir(exist_ok=True)
    (folder / "._____temp" / "r1_data_example.jsonl").write_text('{"question": "half a downl')  # partial download
    return folder


def test_default_data_files_skip_hub_metadata_and_hidden_files(tmp_path):
    folder = fake_snapshot(tmp_path / "snapshot")
    assert select_data_files(folder).files == [folder / "r1_data_example.jsonl"]

    chosen = select_data_files(folder)
    assert chosen.metadata == [folder / "configuration.json", folder / "dataset_infos.json"]
    rows = read_rows(chosen.files)
    assert len(rows.rows) == 5 and not rows.problems
    assert chosen.summary(rows) == ("read r1_data_example.jsonl (5 rows); "
                                    "skipped as hub metadata: configuration.json, dataset_infos.json")
    # Only metadata left: the error names the folder, what it holds and the option to set.
    (folder / "r1_data_example.jsonl").unlink()
    with pytest.raises(FileNotFoundError) as err:
        select_data_files(folder).files
    assert str(err.value) == (
        f"{folder}: folder holds no .jsonl or .json data file besides hub metadata (configuration.json, "
        "dataset_infos.json); it holds: README.md, configuration.json, dataset_infos.json. Set data.data_files to "
        "the files to read (glob patterns relative to the folder, e.g. ['train/*.jsonl']).")


def test_data_files_patterns_choose_the_files_and_name_the_option_when_wrong(tmp_path):
    folder = fake_snapshot(tmp_path / "snapshot")
    write_jsonl(folder / "train" / "part-0.jsonl", make_rows(2))
    write_jsonl(folder / "train" / "part-1.jsonl", make_rows(3))
    parts = [folder / "train/part-0.jsonl", folder / "train/part-1.jsonl"]
    assert select_data_files(folder, ["train/*.jsonl"]).files == parts
    everything = select_data_files(folder, ["**/*.jsonl"]).files
    assert everything == [folder / "r1_data_example.jsonl", *parts]  # never under ._____temp/
    assert select_data_files(folder, ["configuration.json"]).files == [folder / "configuration.json"]  # asked for: read
    with pytest.raises(FileNotFoundError) as err:
        select_data_files(folder, ["*.jsonl", "test/*.jsonl"]).files
    assert str(err.value) == (
        f"data.data_files: 'test/*.jsonl' matches no file in {folder} (it holds: README.md, configuration.json, "
        "dataset_infos.json, r1_data_example.jsonl, train/part-0.jsonl, train/part-1.jsonl)")
    with pytest.raises(ValueError, match=r"data.data_files=\['\*.md'\]: README.md in .*: not a .jsonl or .json"):
        select_data_files(folder, ["*.md"]).files
    with pytest.raises(ValueError, match="not a glob pattern relative to the folder"):
        select_data_files(folder, [str(folder / "*.jsonl")]).files
    # A single file is read as given, whatever its name.
    assert select_data_files(folder / "configuration.json", ["train/*.jsonl"]).files == [folder / "configuration.json"]
