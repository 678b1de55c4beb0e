"""The DataModule counts what it truncates and drops, and its split is deterministic."""

from types import SimpleNamespace

import pytest

from medsft_lightning.data.datamodule import MedicalDataModule
from tests.conftest import make_rows, write_jsonl


def test_rows_without_supervised_tokens_are_dropped_and_counted(tmp_path, tiny_dir):
    rows = make_rows(10)
    for r in rows[:3]:  # prompts longer than max_length: nothing left to supervise
        r["question"] = "Please explain in detail " * 20
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = MedicalDataModule(dataset=str(data), val_dataset=str(data), tokenizer=str(tiny_dir), max_length=48,
                           cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert (dm.stats["train_rows"], dm.stats["train_dropped"]) == (7, 3)
    assert all(len(r["input_ids"]) <= 48 for r in dm.train_set.rows)
    assert dm.stats["train_supervised_tokens"] == sum(r["num_supervised"] for r in dm.train_set.rows)
    # The same content is served from the on-disk cache on a second setup, with the same result.
    again = MedicalDataModule(dataset=str(data), val_dataset=str(data), tokenizer=str(tiny_dir), max_length=48,
                              cache_dir=str(tmp_path / "cache"))
    again.setup("fit")
    assert [r["input_ids"] for r in again.train_set.rows] == [r["input_ids"] for r in dm.train_set.rows]
    assert again.stats == dm.stats


def test_modelscope_snapshot_rows_are_read_and_hub_metadata_skipped(tmp_path, tiny_dir, monkeypatch):
    from medsft_lightning import hub
    from tests.test_sources import fake_snapshot

    snapshot = fake_snapshot(tmp_path / "snapshot", n_rows=20)
    monkeypatch.setattr(hub, "download_dataset", lambda dataset_id, revision, cache_dir: str(snapshot))
    logged: list[str] = []
    monkeypatch.setattr("medsft_lightning.data.datamodule.rank_zero_info", logged.append)
    dm = MedicalDataModule(dataset="krisfu/delicate_medical_r1_data", tokenizer=str(tiny_dir), max_length=256,
                           batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.stats["train_rows"], dm.stats["val_rows"]) == (18, 2)
    assert ("[data] krisfu/delicate_medical_r1_data: read r1_data_example.jsonl (20 rows); "
            "skipped as hub metadata: configuration.json, dataset_infos.json") in logged
    # data.data_files picks files of the dataset folder and of a val_dataset folder alike.
    write_jsonl(tmp_path / "val" / "val_example.jsonl", make_rows(3))
    write_jsonl(tmp_path / "val" / "notes.jsonl", make_rows(1))
    picked = MedicalDataModule(dataset="krisfu/delicate_medical_r1_data", val_dataset=str(tmp_path / "val"),
                               data_files=["*_example.jsonl"], tokenizer=str(tiny_dir),
                               max_length=256, batch_size=2, cache_dir=str(tmp_path / "cache"))
    picked.setup("fit")
    assert (picked.stats["train_rows"], picked.stats["val_rows"]) == (20, 3)
    wrong = MedicalDataModule(dataset="krisfu/delicate_medical_r1_data", data_files=["data/*.jsonl"],
                              tokenizer=str(tiny_dir), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"data.data_files: 'data/\*.jsonl' matches no file in .*snapshot "
                                                r"\(it holds: README.md, configuration.json, "):
        wrong.setup("fit")


def seed_tutorial_split(path):
    """The seed tutorial's split (Qwen3-Medical-SFT's data preparation), run as it is written there."""
    import json
    import random

    state = random.getstate()
    try:
        random.seed(42)
        data_list = [json.loads(line) for line in open(path, encoding="utf-8")]
        random.shuffle(data_list)
        split_idx = int(len(data_list) * 0.9)
        return data_list[:split_idx], data_list[split_idx:]
    finally:
        random.setstate(state)


@pytest.mark.parametrize("n", [52, 96, 2407])
def test_the_split_is_the_seed_tutorials_rows_for_rows(tmp_path, tiny_dir, n):
    """Same rows in train and in val as the tutorial's ``random.seed(42); random.shuffle; int(n * 0.9)``,
    so a medsft val_loss can stand beside the seed's curves (2,407 is about the real dataset's size)."""
    rows = make_rows(n)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    seed_train, seed_val = seed_tutorial_split(data)
    dm = MedicalDataModule(dataset=str(data), tokenizer=str(tiny_dir), cache_dir=str(tmp_path / "cache"))
    train, val = dm.split_rows()
    questions = [r["question"] for r in rows]
    assert sorted(r["question"] for r in val.rows) == sorted(r["question"] for r in seed_val)
    assert sorted(r["question"] for r in train.rows) == sorted(r["question"] for r in seed_train)
    assert len(val.rows) == n - int(n * 0.9)
    # Each row still carries its own file:line.
    assert all(w == f"{data}:{questions.index(r['question']) + 1}" for r, w in zip(val.rows, val.where))


def test_validation_is_sharded_across_ranks_with_equal_batch_counts():
    """Rank r of 2 validates rows r, r+2, …; the shorter shard is padded with rows that supervise nothing."""
    from medsft_lightning.data.datamodule import EncodedDataset

    rows = [{"input_ids": [5] * (3 + i), "attention_mask": [1] * (3 + i), "labels": [-100, -100] + [7] * (1 + i),
             "row_id": i, "num_supervised": 1 + i} for i in range(7)]
    dm = MedicalDataModule(batch_size=2)
    dm.val_set, dm.tokenizer_obj = EncodedDataset(rows), SimpleNamespace(pad_token_id=0)
    seen, batches = [], []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        mine = list(dm.val_dataloader())
        batches.append(len(mine))
        for batch in mine:
            supervised = (batch["labels"] != -100).any(dim=1)
            seen += batch["row_id"][supervised].tolist()
            assert (batch["labels"][~supervised] == -100).all()  # padded slots: no supervised token
    assert batches == [2, 2]  # same number of batches on every rank (FSDP2 forwards are collectives)
    assert sorted(seen) == list(range(7))  # every validation row exactly once across the ranks
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert [r for b in dm.val_dataloader() for r in b["row_id"].tolist()] == list(range(7))
