"""LoRA: only the adapters train, and the merged export gives the adapter model's logits."""

import lightning as L
import pytest
import torch

from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.training.export import save_hf
from medsft_lightning.training.lora import LoraSettings
from medsft_lightning.training.module import MedSFTModule
from tests.conftest import make_rows, write_jsonl

pytest.importorskip("peft")


def test_lora_trains_adapters_only_and_merged_export_matches(tmp_path, tiny_dir, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(8))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(2))
    dm = MedicalDataModule(dataset=str(train), val_dataset=str(val), tokenizer=str(tiny_dir), batch_size=4,
                           max_length=256, cache_dir=str(tmp_path / "cache"))
    module = MedSFTModule(str(tiny_dir), learning_rate=1e-2, gradient_checkpointing=True, lora=LoraSettings())
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, dm)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 7 projections x (A and B)
    assert len(trainable) == 2 * 7 * 2
    for name, param in module.model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name  # adapters moved, every base weight stayed

    ids = torch.tensor([tokenizer("Fever and a cough for two days")["input_ids"]])
    module.model.eval()
    with torch.no_grad():
        adapter_logits = module.model(input_ids=ids).logits
    out = save_hf(module.model, tokenizer, tmp_path / "hf_model")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = plain(input_ids=ids).logits
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    assert (out / "adapter" / "adapter_config.json").is_file()  # the bare adapter as well
    assert not any("lora" in k for k in plain.state_dict())
