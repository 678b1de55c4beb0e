"""The LightningModule under a real Trainer: token-mean loss across accumulation, LR schedule."""

import lightning as L
import pytest
import torch

from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.training.loss import chunked_cross_entropy
from medsft_lightning.training.module import MedSFTModule
from medsft_lightning.training.optim import warmup_cosine
from tests.conftest import make_rows, write_jsonl


class Recorder(L.Callback):
    def __init__(self):
        self.grads, self.losses = None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def one_step(tmp_path, tiny_dir, batch_size: int, accumulate: int) -> Recorder:
    # Answers of very different lengths, so micro-batches hold different token counts.
    rows = [r for n in (1, 30, 4, 12, 2, 20, 7, 3) for r in make_rows(1, answer_words=n)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:2])
    dm = MedicalDataModule(dataset=str(train), val_dataset=str(val), tokenizer=str(tiny_dir),
                           batch_size=batch_size, max_length=256, cache_dir=str(tmp_path / "cache"))
    model = MedSFTModule(str(tiny_dir), learning_rate=1e-3, gradient_checkpointing=False)
    rec = Recorder()
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=1, accumulate_grad_batches=accumulate,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, callbacks=[rec],
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    L.seed_everything(0)
    trainer.fit(model, dm)
    return rec


def test_batch_4_equals_batch_1_times_accumulate_4(tmp_path, tiny_dir):
    whole = one_step(tmp_path / "a", tiny_dir, batch_size=4, accumulate=1)
    split = one_step(tmp_path / "b", tiny_dir, batch_size=1, accumulate=4)
    assert len(split.losses) == 4
    # Lightning reports each micro-batch's loss divided by the accumulation count: they add up to the
    # step's token-mean loss.
    assert sum(split.losses) == pytest.approx(whole.losses[0], abs=1e-5)
    assert whole.grads.keys() == split.grads.keys()
    for name, grad in whole.grads.items():
        assert (grad - split.grads[name]).abs().max() < 1e-5, name
    # Sanity: the unequal micro-batches really differ (a plain per-batch mean would not match).
    assert max(split.losses) - min(split.losses) > 0.5


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_cross_entropy_equals_plain_cross_entropy(tiny_dir, chunk_size):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 150000, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 9:] = -100

    def grads_of(loss_fn):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        loss, n, correct = loss_fn(model)
        loss.backward()
        return loss.detach(), n, correct, {k: p.grad.clone() for k, p in model.named_parameters()}

    def plain(model):  # the full-logits reference: shift, fp32, ignore -100
        logits = model(input_ids=ids).logits[:, :-1].float()
        t = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1), reduction="sum")
        return loss, (t != -100).sum(), ((logits.argmax(-1) == t) & (t != -100)).sum()

    def chunked(model):
        hidden = model.model(input_ids=ids).last_hidden_state
        return chunked_cross_entropy(hidden, model.lm_head.weight, labels, chunk_size)

    ref, got = grads_of(plain), grads_of(chunked)
    assert got[1] == ref[1] == 15
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert got[2] == -1  # accuracy is not measured on the gradient path
    for name, grad in ref[3].items():
        # fp32 sums in another order (through two layers): equal to 5e-5 of the gradient's scale
        assert (got[3][name] - grad).abs().max() <= 5e-5 * grad.abs().max(), name
    with torch.no_grad():  # the no-grad path (validation) gives the same numbers
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        loss, n, correct = chunked(model)
        assert loss.item() == pytest.approx(ref[0].item(), rel=1e-6) and correct == ref[2]


def test_chunked_cross_entropy_in_bf16_matches_plain_bf16(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 150000, (2, 16))
    labels = ids.clone()
    labels[:, :4] = -100

    def run(chunked: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
        if chunked:
            loss, _, _ = chunked_cross_entropy(model.model(input_ids=ids).last_hidden_state, model.lm_head.weight,
                                               labels, 7)
        else:
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                     reduction="sum")
        loss.backward()
        return loss.item(), {k: p.grad.float() for k, p in model.named_parameters()}

    (ref_loss, ref), (loss, got) = run(False), run(True)
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    for name, grad in ref.items():  # bf16 resolution is 2^-8 of the scale
        assert (got[name] - grad).abs().max() <= 2e-2 * grad.abs().max(), name


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(1 / 11)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)


class NaNAtStep1(MedSFTModule):
    """Produces a NaN loss on the batch trained at global step 1, and remembers that batch's rows."""

    def forward(self, batch):
        loss_sum, n_tokens, correct = super().forward(batch)
        if self.training and self.trainer.global_step == 1 and not hasattr(self, "bad_rows"):
            self.bad_rows = batch["row_id"].tolist()
            loss_sum = loss_sum * float("nan")
        return loss_sum, n_tokens, correct


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_nonfinite_loss_names_its_rows_or_is_skipped(tmp_path, tiny_dir, policy):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(2))
    dm = MedicalDataModule(dataset=str(train), val_dataset=str(val), tokenizer=str(tiny_dir), batch_size=2,
                           max_length=256, cache_dir=str(tmp_path / "cache"))
    model = NaNAtStep1(str(tiny_dir), learning_rate=1e-3, gradient_checkpointing=False, on_nonfinite_loss=policy)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    if policy == "error":
        with pytest.raises(FloatingPointError) as err:
            trainer.fit(model, dm)
        where = ", ".join(f"{train}:{i + 1}" for i in model.bad_rows)  # row i of the file is line i + 1
        assert f"non-finite training loss (nan) at step 1 (epoch 0, batch 1); its rows: {where}." in str(err.value)
        return
    trainer.fit(model, dm)
    assert model.nonfinite_skipped == 1
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3  # the bad batch made no update
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights
