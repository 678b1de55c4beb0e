import pytest
import torch

from medsft_lightning.data.collate import pad_collate

ROWS = [
    {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "row_id": 3, "window_tokens": 9},
    {"input_ids": [8], "attention_mask": [1], "labels": [8], "row_id": 0, "window_tokens": 9},
]


def test_right_pads_ids_mask_and_labels():
    batch = pad_collate(ROWS, pad_id=151643)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 151643, 151643]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [8, -100, -100]]))
    assert torch.equal(batch["row_id"], torch.tensor([3, 0]))
    assert torch.equal(batch["window_tokens"], torch.tensor([9, 9]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_to_multiple_of():
    batch = pad_collate(ROWS, pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 5
    assert batch["attention_mask"][1].tolist() == [1] + [0] * 7


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        pad_collate([], pad_id=0)
