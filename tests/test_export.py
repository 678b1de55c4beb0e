"""``medsft export`` and checkpoint reading: LoRA and bf16 checkpoints, weights_only, no hub for a cached base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from medsft_lightning import hub
from medsft_lightning.training.checkpoints import UnsafeCheckpointError, checkpoint_metadata
from medsft_lightning.training.export import export_checkpoint
from medsft_lightning.training.lora import LoraSettings
from medsft_lightning.training.module import MedSFTModule
from tests.conftest import offline_env

# What LightningCLI saves as a checkpoint's hyper_parameters: the parsed config, nested settings as plain dicts.
CLI_HPARAMS = {"learning_rate": 1e-5, "generation": {"max_new_tokens": 64}, "_instantiator": "lightning.pytorch.cli"}


def write_checkpoint(path: Path, module: MedSFTModule, **hparams) -> Path:
    """A Lightning-style checkpoint of ``module`` with the given hyper_parameters (as the CLI writes them)."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 3}, path)
    return path


def test_lora_checkpoint_with_dict_hparams_exports_merged(tmp_path, tiny_dir):
    pytest.importorskip("peft")
    module = MedSFTModule(str(tiny_dir), lora=LoraSettings(r=4))
    module.configure_model()
    with torch.no_grad():  # make the adapters count: B starts at zero
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    assert module.hparams["lora"]["r"] == 4  # kept as a plain dict, as LightningCLI saves it
    lora = {"r": 4, "alpha": 32, "dropout": 0.1, "target_modules": list(LoraSettings().target_modules)}
    ckpt = write_checkpoint(tmp_path / "lora.ckpt", module, model_name_or_path=str(tiny_dir), **CLI_HPARAMS, lora=lora)
    out = export_checkpoint(ckpt, tmp_path / "out")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[9707, 1879, 11, 1052]])
    module.model.eval()
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - module.model(input_ids=ids).logits).abs().max() < 1e-4
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_bf16_checkpoint_exports_bf16_with_both_dtype_keys(tmp_path, tiny_dir):
    module = MedSFTModule(str(tiny_dir))
    module.configure_model()
    module.model.to(torch.bfloat16)
    ckpt = write_checkpoint(tmp_path / "bf16.ckpt", module, model_name_or_path=str(tiny_dir), **CLI_HPARAMS)
    out = export_checkpoint(ckpt, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    size = (out / "model.safetensors").stat().st_size
    n = sum(p.numel() for p in module.model.parameters())  # tied head stored once
    assert size < n * 2 * 1.01  # 2 bytes a weight, not fp32's 4


class RunsCode:
    """Unpickling this calls ``Path.touch`` on a file: what a crafted checkpoint could do with any function."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


@pytest.mark.e2e  # a console-script subprocess
def test_checkpoint_that_would_run_code_is_refused(tmp_path, cache_root):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name_or_path": hub.TINY_MODEL},
                "payload": RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        export_checkpoint(evil, tmp_path / "out")
    with pytest.raises(UnsafeCheckpointError):
        checkpoint_metadata(evil)  # the path --ckpt_path takes for resuming and for its hyperparameters
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "medsft_lightning.cli", "export", str(evil), str(tmp_path / "o")],
                          capture_output=True, text=True, env=offline_env(cache_root), timeout=120)
    assert proc.returncode != 0 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_export_takes_a_cached_base_model_without_the_hub(tmp_path, tiny_dir, monkeypatch):
    calls = []

    def cached_only(model_id, revision, cache_dir, allow_patterns=None, local_files_only=False):
        calls.append((model_id, revision, local_files_only))
        if not local_files_only:
            raise RuntimeError("test tried to reach ModelScope")
        return str(tiny_dir)

    monkeypatch.setattr(hub, "download_model", cached_only)
    module = MedSFTModule(str(tiny_dir))
    module.configure_model()
    ckpt = write_checkpoint(tmp_path / "hub.ckpt", module, model_name_or_path="Qwen/Qwen3-1.7B",
                            model_revision="v1", **CLI_HPARAMS)
    out = export_checkpoint(ckpt, tmp_path / "out")
    assert calls == [("Qwen/Qwen3-1.7B", "v1", True)]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
