"""Checkpoints and the config: the user's flags beat a checkpoint's saved hyperparameters, a resumed fit takes a
new LR, and every checkpoint lands on an optimizer-step boundary."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from medsft_lightning.cli import MedSFTCLI, check_config
from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.training.module import MedSFTModule
from medsft_lightning.training.optim import warmup_cosine
from tests.conftest import make_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]


class ParseOnly(MedSFTCLI):
    """The CLI up to the point where it would run the subcommand."""

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def test_flags_and_config_beat_the_checkpoints_hyperparameters(tmp_path, cache_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "saved.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "model_name_or_path": "medsft:tiny-qwen3", "learning_rate": 1e-5, "warmup_ratio": 0.5, "generation": None,
        "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, ckpt)
    cli = ParseOnly(args=["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--ckpt_path", str(ckpt),
                          "--model.learning_rate", "3e-3", "--model.generation.max_new_tokens", "7"])
    assert cli.model.hparams.learning_rate == 3e-3  # the flag, not the checkpoint's 1e-5
    assert cli.model.generation.max_new_tokens == 7  # not the checkpoint's generation: null
    assert cli.model.hparams.warmup_ratio == 0.05  # demo.yaml's value, not the checkpoint's 0.5


def rows_module(tmp_path: Path, tiny_dir: Path, n: int = 12) -> MedicalDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(n))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(2))
    return MedicalDataModule(dataset=str(train), val_dataset=str(val), tokenizer=str(tiny_dir), batch_size=2,
                             max_length=128, cache_dir=str(tmp_path / "cache"))


def trainer(tmp_path: Path, callbacks: list, precision: str = "32-true", **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
                     num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


class LRs(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_resumed_fit_trains_with_the_new_learning_rate(tmp_path, tiny_dir):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    first = MedSFTModule(str(tiny_dir), learning_rate=1e-3, warmup_ratio=0.0, gradient_checkpointing=False)
    trainer(tmp_path, [saver], max_steps=2, limit_val_batches=0).fit(first, rows_module(tmp_path / "a", tiny_dir))
    lrs = LRs()
    resumed = MedSFTModule(str(tiny_dir), learning_rate=4e-3, warmup_ratio=0.0, gradient_checkpointing=False)
    trainer(tmp_path, [lrs], max_steps=4, limit_val_batches=0).fit(
        resumed, rows_module(tmp_path / "b", tiny_dir), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # Steps 2 and 3 of a 4-step cosine at the new peak LR (the checkpoint's optimizer had 1e-3 built in).
    assert lrs.lrs == pytest.approx([4e-3 * warmup_cosine(s, 4, 0, 0.1) for s in (2, 3)])


class Validations(L.Callback):
    def __init__(self) -> None:
        self.at: list[int] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self.at.append(trainer.fit_loop.epoch_loop.batch_progress.current.completed)


def test_validation_and_its_checkpoint_land_on_optimizer_steps(tmp_path, tiny_dir):
    # 12 rows / batch 2 = 6 micro-batches; 0.5 epoch = 3 would fall inside the second 2-micro-batch window.
    seen, saver = Validations(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    module = MedSFTModule(str(tiny_dir), learning_rate=1e-3, gradient_checkpointing=False)
    trainer(tmp_path, [seen, saver], max_epochs=1, accumulate_grad_batches=2, val_check_interval=0.5).fit(
        module, rows_module(tmp_path, tiny_dir))
    assert seen.at == [2, 4, 6]  # Lightning alone: [3, 6]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["MedicalDataModule"]["batches_done"] % 2 == 0


def test_an_interval_inside_an_accumulation_window_is_refused():
    def problems(interval):
        return check_config({"data": {"max_length": 512},
                             "trainer": {"accumulate_grad_batches": 2, "val_check_interval": interval}})

    assert any("--trainer.val_check_interval=135" in p and "e.g. 134" in p for p in problems(135))
    assert problems(134) == problems(0.25) == []
    assert any("time-based" in p for p in problems("00:00:10:00"))


def test_bf16_true_logs_val_loss_unrounded_and_bf16_mixed_clips(tmp_path, tiny_dir):
    """Two real-path traps: bf16-true turned the val metrics' states into bf16 (val_loss 11.96 logged as 12.0),
    and bf16-mixed with gradient clipping stopped at the first step (Lightning refuses it with fused AdamW)."""
    dm = rows_module(tmp_path, tiny_dir)
    module = MedSFTModule(str(tiny_dir), gradient_checkpointing=False)
    [logged] = trainer(tmp_path, [], precision="bf16-true").validate(module, dm)
    dm.setup("validate")
    total = count = 0.0
    with torch.no_grad():  # the same bf16 model's loss, summed in Python floats
        for batch in dm.val_dataloader():
            loss_sum, n, _ = module(batch)
            total, count = total + loss_sum.item(), count + n.item()
    assert module.val_loss.mean_value.dtype == torch.float32
    assert logged["val_loss"] == pytest.approx(total / count, abs=1e-5)

    mixed = MedSFTModule(str(tiny_dir), gradient_checkpointing=False)
    trainer(tmp_path, [], precision="bf16-mixed", max_steps=1, limit_val_batches=0, gradient_clip_val=1.0).fit(
        mixed, rows_module(tmp_path / "mixed", tiny_dir))
    assert not mixed.trainer.optimizers[0].defaults["fused"]
