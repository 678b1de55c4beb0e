"""The sample callback: rounds in samples.jsonl, and training continues bit-for-bit as without it."""

from __future__ import annotations

import csv
import json
import shutil

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.generation.generate import Generation
from medsft_lightning.generation.samples import SampleGenerations
from medsft_lightning.training.module import MedSFTModule
from tests.conftest import make_rows, write_jsonl


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())


def train(tmp_path, model_dir, with_samples: bool):
    rows = [r for n in (2, 9, 4) for r in make_rows(6, answer_words=n)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = MedicalDataModule(dataset=str(data), tokenizer=str(model_dir), batch_size=2, max_length=96,
                           val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    model = MedSFTModule(str(model_dir), learning_rate=1e-3, gradient_checkpointing=True,
                         cache_dir=dm.hparams.cache_dir)
    losses = Losses()
    callbacks = [losses]
    if with_samples:  # sampling draws from the RNG; dropout in training does too
        callbacks.append(SampleGenerations(num_samples=2, generation=Generation(max_new_tokens=6, do_sample=True)))
    trainer = L.Trainer(accelerator="cpu", max_steps=6, val_check_interval=2, num_sanity_val_steps=0,
                        logger=CSVLogger(tmp_path / "runs"), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, use_distributed_sampler=False)
    L.seed_everything(3)
    trainer.fit(model, dm)
    assert model.model.training and model.model.is_gradient_checkpointing and not model.model.config.use_cache
    return losses.values, trainer.log_dir


def test_training_is_bit_for_bit_the_same_with_the_callback(tmp_path, tiny_dir):
    dropout_dir = tmp_path / "tiny-dropout"
    shutil.copytree(tiny_dir, dropout_dir)
    config = json.loads((dropout_dir / "config.json").read_text())
    config["attention_dropout"] = 0.2
    (dropout_dir / "config.json").write_text(json.dumps(config))

    plain, _ = train(tmp_path / "plain", dropout_dir, with_samples=False)
    with pytest.warns(UserWarning, match=r"--samples.generation.max_new_tokens=6 is below the longest reference"):
        sampled, log_dir = train(tmp_path / "sampled", dropout_dir, with_samples=True)
    assert len(plain) == 6 and plain == sampled  # exact equality, not approximate

    lines = [json.loads(x) for x in open(f"{log_dir}/samples.jsonl", encoding="utf-8")]
    assert [x["round"] for x in lines] == [0, 0, 1, 1, 2, 2, 3, 3]  # baseline + one per validation (3)
    assert [x["step"] for x in lines[::2]] == [0, 2, 4, 6]
    assert lines[0]["baseline"] and not lines[2]["baseline"]
    for x in lines:
        assert {"question", "think", "answer", "raw", "reference", "think_format_rate", "finish_reason"} <= set(x)
    with open(f"{log_dir}/metrics.csv", encoding="utf-8") as f:
        logged = [r for r in csv.DictReader(f) if r.get("sample/think_format_rate")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4, 6] and all(r["sample/answer_chars"] for r in logged)
    for r, first in zip(logged, lines[::2]):  # the share of the round's answers cut off at max_new_tokens
        cut = [x["finish_reason"] == "length" for x in lines if x["round"] == first["round"]]
        assert float(r["sample/truncation_rate"]) == sum(cut) / 2
