"""Packing and length grouping: exact packs and tensors, no attention or loss across examples."""

import lightning as L
import pytest
import torch

from medsft_lightning.data.collate import IGNORE_INDEX
from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.data.encoding import encode_rows
from medsft_lightning.data.packing import PackedDataset, concat_rows, pack_collate, pack_rows, packed_model_inputs
from medsft_lightning.data.sampler import PAD_INDEX, WindowBatchSampler
from medsft_lightning.training.module import MedSFTModule
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


# -- batch > 1 packs: the layout each attention implementation reads as packed (packing.packed_model_inputs) --------


@pytest.fixture(scope="module")
def pack_batch(tmp_path_factory, tiny_dir):
    """The first training batch of the real DataModule with ``batching="pack"``, ``batch_size=2``, and its rows."""
    tmp = tmp_path_factory.mktemp("pack-batch")
    rows = [r for n in (1, 30, 4, 12, 2, 20, 7, 3) for r in make_rows(1, answer_words=n)]
    dm = MedicalDataModule(dataset=str(write_jsonl(tmp / "train.jsonl", rows)),
                           val_dataset=str(write_jsonl(tmp / "val.jsonl", rows[:2])), tokenizer=str(tiny_dir),
                           batching="pack", batch_size=2, max_length=160, cache_dir=str(tmp / "cache"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    by_id = {r["row_id"]: r for r in dm.train_set.rows}
    members = [[by_id[i] for i in ids if i >= 0] for ids in batch["row_id"].tolist()]
    width = batch["input_ids"].size(1)
    assert len(members) == 2 and all(len(m) >= 2 for m in members)  # two rows, each holding 2+ examples
    assert any(sum(len(r["input_ids"]) for r in m) < width for m in members)  # and a padding run
    return batch, members


def _example_spans(members: list[list[dict]], width: int) -> list[list[tuple[int, int]]]:
    """``(start, end)`` of every example in each packed row."""
    spans = []
    for rows in members:
        starts = [0]
        for row in rows:
            starts.append(starts[-1] + len(row["input_ids"]))
        spans.append(list(zip(starts[:-1], starts[1:])))
    return spans


def _flat_boundaries(members: list[list[dict]], width: int) -> list[int]:
    """cu_seqlens of the rows laid end to end: every example, then the row's padding run (if any)."""
    cu = [0]
    for b, rows in enumerate(members):
        for row in rows:
            cu.append(cu[-1] + len(row["input_ids"]))
        if cu[-1] < (b + 1) * width:
            cu.append((b + 1) * width)
    return cu


def _module(tiny_dir, attn: str) -> MedSFTModule:
    """The module's model, set to ``attn``; flash-attention is set on the config only (flash-attn is not installed:
    the model is built with sdpa and a stand-in kernel, :func:`stand_in_flash`, runs where the kernel would)."""
    module = MedSFTModule(str(tiny_dir), gradient_checkpointing=False,
                          attn_implementation="sdpa" if "flash" in attn else attn)
    module.configure_model()
    module.model.config._attn_implementation = attn
    return module


class _Captured(Exception):
    pass


def test_flash_attention_gets_one_flat_row_that_transformers_reads_as_packed(tiny_dir, pack_batch):
    """What MedSFTModule.forward passes to the decoder under flash_attention_2, checked with transformers' own
    detection (``_is_packed_sequence``) and cu_seqlens derivation (``prepare_fa_kwargs_from_position_ids``)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    batch, members = pack_batch
    rows, width = batch["input_ids"].shape
    # The defect: [batch, L] rows with restarting positions are not packed for flash-attention at batch > 1.
    assert not _is_packed_sequence(batch["position_ids"], batch_size=rows)
    module = _module(tiny_dir, "flash_attention_2")
    captured = {}

    def capture(_, args, kwargs):
        captured.update(kwargs)
        raise _Captured  # the FA kernel itself is not needed here

    module.model.model.register_forward_pre_hook(capture, with_kwargs=True)
    with pytest.raises(_Captured):
        module(batch)
    ids, positions = captured["input_ids"], captured["position_ids"]
    assert ids.shape == (1, rows * width) and captured["attention_mask"] is None
    assert ids[0].tolist() == batch["input_ids"].flatten().tolist()
    assert _is_packed_sequence(positions, batch_size=ids.shape[0])
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(positions)
    expected = _flat_boundaries(members, width)
    assert cu_q.tolist() == cu_k.tolist() == expected  # exactly the example boundaries (and padding runs)
    assert captured["cu_seq_lens_q"].tolist() == captured["cu_seq_lens_k"].tolist() == expected
    assert captured["max_length_q"] == captured["max_length_k"] == int(max_q)
    # The FSDP2 root unit gets the very same inputs.
    root_calls = []
    object.__setattr__(module, "fsdp_root", lambda *args, **kwargs: root_calls.append((args, kwargs)))
    module(batch)
    (args, kwargs), = root_calls
    assert args[0].tolist() == ids.tolist() and args[2] == module.hparams.loss_chunk_size
    assert sorted(kwargs) == sorted(k for k in captured if k not in ("input_ids", "use_cache"))
    assert kwargs["position_ids"].tolist() == positions.tolist() and kwargs["max_length_q"] == captured["max_length_q"]


def test_flat_layout_keeps_padding_runs_and_row_starts_unsupervised():
    """Padding runs of 0 and 1 tokens; the flat row is also packed for transformers' mask builder."""
    from transformers.masking_utils import find_packed_sequence_indices

    items = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
             {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9], "position_ids": [0, 1, 2, 3]},
             {"input_ids": [6, 7, 8, 9, 5], "labels": [3, 7, 8, -100, 5], "position_ids": [0, 1, 2, 0, 1]}]
    batch = pack_collate(items, pad_id=0)
    ids, labels, kw = packed_model_inputs(batch, "flash_attention_2")
    assert kw["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0, 1, 2, 0, 1]]
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10, 13, 15] and kw["max_length_q"] == 4
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    # Padding (the 1-token run at 9) and every row's first token are never targets; the rest is unchanged.
    assert labels.tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8, 9, -100, -100, 7, 8, -100, 5]]
    assert batch["labels"][2, 0] == 3  # the input batch is not modified
    assert find_packed_sequence_indices(kw["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 5, 5]]
    for attn in ("sdpa", "eager", "flex_attention"):  # a dense mask per row: B * L**2, not (B * L)**2
        ids, labels, kw = packed_model_inputs(batch, attn)
        assert ids is batch["input_ids"] and labels is batch["labels"] and kw["position_ids"] is batch["position_ids"]
        assert kw["attention_mask"] is None and sorted(kw) == ["attention_mask", "position_ids"]
    padded = {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": batch["attention_mask"]}
    assert packed_model_inputs(padded, "paged|eager")[2] == {"attention_mask": batch["attention_mask"]}
    for attn in ("paged|eager", None, "my-org/sparse-kernel"):
        with pytest.raises(ValueError, match=r"--data.batching pack .*--model.attn_implementation .*group_by_length"):
            packed_model_inputs(batch, attn)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                      softmax_scale=None, causal=False):
    """Stand-in for ``flash_attn_varlen_func`` in pure torch: ``[total, heads, dim]``, one causal block per run."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and dropout_p == 0.0
    assert max_seqlen_q == int(cu_seqlens_q.diff().max())
    _varlen_attention.calls.append(cu_seqlens_q.tolist())
    k, v = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        q_, k_, v_ = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q_, k_, v_, is_causal=causal, scale=softmax_scale).transpose(0, 1)
    return out


def _dense_attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Stand-in for ``flash_attn_func``: ``[batch, L, heads, dim]``, each row one causal sequence."""
    k, v = (x.repeat_interleave(q.size(2) // x.size(2), dim=2) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)


@pytest.fixture
def stand_in_flash(monkeypatch):
    """transformers' real flash-attention path (``integrations.flash_attention.flash_attention_forward`` →
    ``_flash_attention_forward``) with pure-torch kernels in place of the flash-attn package: the functions
    ``lazy_import_flash_attention`` would have imported, already "loaded" for ``flash_attention_2``."""
    import transformers.modeling_flash_attention_utils as fa

    _varlen_attention.calls = []
    monkeypatch.setattr(fa, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa, "_flash_fn", _dense_attention)
    monkeypatch.setattr(fa, "_flash_varlen_fn", _varlen_attention)
    monkeypatch.setattr(fa, "_flash_with_kvcache_fn", None)
    monkeypatch.setattr(fa, "_pad_fn", fa._pad_input)
    monkeypatch.setattr(fa, "_unpad_fn", fa._unpad_input)
    monkeypatch.setattr(fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(_varlen_attention))
    monkeypatch.setattr(fa, "_process_with_kvcache_kwargs_fn", dict)
    return _varlen_attention.calls


def _row_token_losses(model, input_ids, labels, rows: int, **inputs) -> torch.Tensor:
    """``[rows, L - 1]`` per-token losses (0 where unsupervised), whether the batch went as rows or as one flat row."""
    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                               ignore_index=IGNORE_INDEX)
    losses = torch.cat([losses, losses.new_zeros(losses.size(0), 1)], dim=1).reshape(rows, -1)
    return losses[:, :-1]  # a flat row's position L-1 of row b predicts row b+1's first token: never a target


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
def test_packed_batch_of_two_rows_gives_unpacked_losses_per_example(tiny_dir, pack_batch, request, attn):
    """Batch 2 of real packs: every example's per-token losses equal running it alone (to 1e-5), through each
    attention implementation's real transformers code path (flash: with the stand-in kernels), and
    MedSFTModule.forward's loss sum equals the examples' losses summed."""
    from transformers import AutoModelForCausalLM

    calls = request.getfixturevalue("stand_in_flash") if "flash" in attn else None
    batch, members = pack_batch
    rows, width = batch["input_ids"].shape
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
    module = _module(tiny_dir, attn)
    model = module.model
    spans = _example_spans(members, width)
    with torch.no_grad():
        single = {}
        for row in (r for m in members for r in m):
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            single[row["row_id"]] = _row_token_losses(reference, ids, labels, 1, attention_mask=torch.ones_like(ids))[0]
        input_ids, labels, inputs = packed_model_inputs(batch, attn)
        assert input_ids.shape == ((1, rows * width) if "flash" in attn else (rows, width))
        packed = _row_token_losses(model, input_ids, labels, rows, **inputs)
        if "flash" in attn:
            # What the old code sent: [B, L] rows, restarting positions, no mask. transformers' FA path runs each row
            # as one causal sequence (_is_packed_sequence is False at batch 2): examples see the ones before them.
            control = _row_token_losses(model, batch["input_ids"], batch["labels"], rows,
                                        position_ids=batch["position_ids"], attention_mask=None)
            assert calls == [_flat_boundaries(members, width)] * model.config.num_hidden_layers  # the varlen kernel
        else:  # positions that do not restart: examples see each other
            control = _row_token_losses(model, batch["input_ids"], batch["labels"], rows,
                                        attention_mask=torch.ones_like(batch["input_ids"]))
        loss_sum, n_tokens, _ = module(batch)
    expected_sum = 0.0
    for b in range(rows):
        for k, ((start, end), row) in enumerate(zip(spans[b], members[b])):
            reference_losses = single[row["row_id"]]
            assert (packed[b, start : end - 1] - reference_losses).abs().max() < 1e-5, (b, k)
            if k > 0:
                assert (control[b, start : end - 1] - reference_losses).abs().max() > 1e-3, (b, k)
            if end - 1 < width - 1:
                assert packed[b, end - 1] == 0  # no prediction across the boundary
            expected_sum += reference_losses.sum().item()
        assert packed[b, spans[b][-1][1]:].abs().sum() == 0  # the padding run trains nothing
    assert n_tokens == sum(r["num_supervised"] for m in members for r in m)
    assert loss_sum.item() == pytest.approx(expected_sum, rel=1e-6)  # fp32 sums of ~1,500: a few ulps


def test_config_check_refuses_pack_with_an_attention_that_ignores_packing():
    from medsft_lightning.cli import check_config

    def problems(attn):
        return check_config({"data": {"max_length": 512, "batching": "pack"}, "model": {"attn_implementation": attn}})

    assert problems("sdpa") == problems("flash_attention_2") == []
    assert any("--model.attn_implementation='paged|eager'" in p for p in problems("paged|eager"))
