"""configs/full.yaml's data and model setup, with the ModelScope download functions returning local folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from medsft_lightning import hub
from medsft_lightning.cli import MedSFTCLI

REPO = Path(__file__).resolve().parents[1]


def test_full_config_setup_with_downloads_replaced(tmp_path, monkeypatch, tiny_dir):
    calls = []
    dataset_dir = tmp_path / "ms-dataset"
    dataset_dir.mkdir()
    shutil.copy(hub.sample_dataset_path(), dataset_dir / "train.jsonl")

    def fake_model(model_id, revision, cache_dir, allow_patterns=None, local_files_only=False):
        calls.append(("model", model_id, revision))
        return str(tiny_dir)

    def fake_dataset(dataset_id, revision, cache_dir):
        calls.append(("dataset", dataset_id, revision))
        return str(dataset_dir)

    monkeypatch.setattr(hub, "download_model", fake_model)
    monkeypatch.setattr(hub, "download_dataset", fake_dataset)
    monkeypatch.chdir(tmp_path)
    # Only what this CPU cannot do is overridden: the GPU and bf16.
    cli = MedSFTCLI(args=["--config", str(REPO / "configs" / "full.yaml"), "--trainer.accelerator", "cpu",
                          "--trainer.precision", "32-true", "--model.cache_dir", str(tmp_path / "cache")], run=False)
    dm, model = cli.datamodule, cli.model
    assert dm.hparams.tokenizer == "Qwen/Qwen3-1.7B"  # linked from model.model_name_or_path
    assert (dm.hparams.max_length, dm.hparams.batch_size, dm.hparams.split_seed) == (2048, 4, 42)
    assert model.hparams.gradient_checkpointing is True

    dm.prepare_data()
    dm.setup("fit")
    assert ("dataset", "krisfu/delicate_medical_r1_data", "master") in calls
    assert ("model", "Qwen/Qwen3-1.7B", None) in calls
    assert dm.stats["train_rows"] + dm.stats["val_rows"] == 96
    assert dm.stats["val_rows"] == 10  # 90/10 split

    model.configure_model()
    assert model.model.is_gradient_checkpointing and model.model.training
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] % 8 == 0  # pad_to_multiple_of: 8
    loss_sum, n_tokens, _ = model(batch)
    assert n_tokens > 0 and torch.isfinite(loss_sum)


def test_the_tokenizer_is_downloaded_at_the_model_revision(tmp_path, monkeypatch, tiny_dir):
    calls = []

    def fake_model(model_id, revision, cache_dir, allow_patterns=None, local_files_only=False):
        calls.append((model_id, revision, cache_dir, allow_patterns))
        return str(tiny_dir)

    monkeypatch.setattr(hub, "download_model", fake_model)
    monkeypatch.setattr(hub, "download_dataset", lambda dataset_id, revision, cache_dir: str(hub.sample_dataset_path()))
    monkeypatch.chdir(tmp_path)
    cli = MedSFTCLI(args=["--config", str(REPO / "configs" / "full.yaml"), "--trainer.accelerator", "cpu",
                          "--trainer.precision", "32-true", "--model.model_revision", "v1.0",
                          "--model.cache_dir", str(tmp_path / "cache")], run=False)
    dm = cli.datamodule
    assert dm.hparams.tokenizer_revision == "v1.0"  # linked from model.model_revision
    dm.prepare_data()
    dm.load_tokenizer()
    assert calls == [("Qwen/Qwen3-1.7B", "v1.0", str(tmp_path / "cache"), hub.TOKENIZER_FILES)] * 2
