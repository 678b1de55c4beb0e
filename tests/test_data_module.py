"""The DataModule counts what it truncates and drops, and its split is deterministic."""

from medsft_lightning.data import MedicalDataModule
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
