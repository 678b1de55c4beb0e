"""Packing and length grouping: exact packs and tensors, no attention or loss across examples."""

import lightning as L
import pytest
import torch

from medsft_lightning.collate import IGNORE_INDEX
from medsft_lightning.data import MedicalDataModule
from medsft_lightning.encoding import encode_rows
from medsft_lightning.module import MedSFTModule
from medsft_lightning.packing import PackedDataset, concat_rows, pack_collate, pack_rows
from medsft_lightning.sampler import PAD_INDEX, WindowBatchSampler
from tests.conftest import make_rows, write_jsonl
from tests.test_module import Recorder


def test_pack_rows_fits_every_row_once_and_is_deterministic():
    lengths = [50, 20, 90, 10, 60, 40, 30, 100, 5, 70]
    packs = pack_rows(lengths, capacity=100, seed=3)
    assert sorted(i for p in packs for i in p) == list(range(10))
    assert all(sum(lengths[i] for i in p) <= 100 for p in packs)
    assert len(packs) == 5  # 475 tokens: the minimum number of 100-token packs
    assert pack_rows(lengths, capacity=100, seed=3) == packs
    with pytest.raises(ValueError, match="101 tokens does not fit a pack of 100"):
        pack_rows([101], capacity=100)


def test_concat_and_collate_give_exact_tensors():
    rows = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13], "num_supervised": 2},
            {"input_ids": [21, 22], "labels": [21, 22], "num_supervised": 2},
            {"input_ids": [31], "labels": [-100], "num_supervised": 0}]
    packed = concat_rows(rows[:2])
    # The second example's first label is masked: no prediction across the boundary.
    assert packed == {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, -100, 22],
                      "position_ids": [0, 1, 2, 0, 1]}
    ds = PackedDataset(rows, [[0, 1], [2]])
    assert ds.num_supervised == [4, 0]
    batch = pack_collate([ds[(0, 9)], ds[(1, 9)]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["window_tokens"].tolist() == [9, 9]
    assert ds[(PAD_INDEX, 9)]["labels"] == [IGNORE_INDEX] * 5


def _token_losses(model, input_ids, labels, **inputs) -> torch.Tensor:
    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none",
                                             ignore_index=IGNORE_INDEX)


@pytest.fixture(scope="module")
def three_rows(tokenizer):
    rows = [r for n in (2, 15, 6) for r in make_rows(1, answer_words=n)]
    return encode_rows(rows, tokenizer, system_prompt="You are careful.", max_length=512)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_per_example(tiny_dir, three_rows, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attn)
    single = []
    for row in three_rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        single.append(_token_losses(model, ids, labels, attention_mask=torch.ones_like(ids)))
    batch = pack_collate([concat_rows(three_rows)], pad_id=0)
    packed = _token_losses(model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                           attention_mask=None)
    # Control: the same row with positions that do not restart lets examples see each other.
    ones = torch.ones_like(batch["input_ids"])
    leaky = _token_losses(model, batch["input_ids"], batch["labels"], attention_mask=ones)
    start = 0
    for k, row in enumerate(three_rows):
        end = start + len(row["input_ids"])
        # predictions made from positions start .. end-2 belong to example k (end-1 predicts the next example)
        assert (packed[start : end - 1] - single[k]).abs().max() < 1e-5
        per_example = packed[start : end - 1].sum() / row["num_supervised"]
        assert per_example.item() == pytest.approx((single[k].sum() / row["num_supervised"]).item(), abs=1e-5)
        if k > 0:
            assert (leaky[start : end - 1] - single[k]).abs().max() > 1e-3
        if end - 1 < len(packed):
            assert packed[end - 1] == 0  # the last token of an example is not trained to predict the next one
        start = end


def test_group_by_length_batches_similar_rows_and_covers_each_row_once():
    lengths = [(i * 37) % 101 + 1 for i in range(40)]
    sampler = WindowBatchSampler([1] * 40, batch_size=4, seed=1, lengths=lengths, group_by_length=True)
    batches = [[i for i, _ in b] for b in sampler]
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in batches)  # each batch sorted, longest first
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    plain = WindowBatchSampler([1] * 40, batch_size=4, seed=1)
    plain_padding = sum(max(lengths[i] for i, _ in b) * len(b) - sum(lengths[i] for i, _ in b) for b in plain)
    assert padding < plain_padding / 4
    sampler.set_epoch(1)
    assert [[i for i, _ in b] for b in sampler] != batches  # still reshuffled every epoch
    ranks = [[i for b in WindowBatchSampler([1] * 40, 4, num_replicas=2, rank=r, lengths=lengths,
                                             group_by_length=True) for i, _ in b] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(40))


def _one_step(tmp_path, tiny_dir, batching: str, batch_size: int) -> tuple[Recorder, MedicalDataModule]:
    rows = [r for n in (1, 30, 4, 12, 2, 20, 7, 3) for r in make_rows(1, answer_words=n)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:2])
    dm = MedicalDataModule(dataset=str(train), val_dataset=str(val), tokenizer=str(tiny_dir), batching=batching,
                           batch_size=batch_size, max_length=256, cache_dir=str(tmp_path / "cache"))
    model = MedSFTModule(str(tiny_dir), learning_rate=1e-3, gradient_checkpointing=False)
    rec = Recorder()
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, callbacks=[rec], enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    L.seed_everything(0)
    trainer.fit(model, dm)
    return rec, dm


def test_packed_step_equals_padded_step(tmp_path, tiny_dir):
    """All 8 rows in one optimizer step: packed into 256-token rows or padded, the same loss and gradients."""
    padded, _ = _one_step(tmp_path / "pad", tiny_dir, "pad", batch_size=8)
    packed, dm = _one_step(tmp_path / "pack", tiny_dir, "pack", batch_size=8)
    packs = dm.train_dataloader().dataset.packs
    assert len(packs) < 8 and sorted(i for p in packs for i in p) == list(range(8))  # really packed
    assert packed.losses[0] == pytest.approx(padded.losses[0], abs=1e-5)
    for name, grad in padded.grads.items():
        assert (grad - packed.grads[name]).abs().max() < 1e-5, name
