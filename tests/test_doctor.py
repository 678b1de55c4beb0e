"""``medsft doctor``: a fresh export passes; each way an export can go wrong for vLLM fails, naming its check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from medsft_lightning.tools.doctor import diagnose, report
from medsft_lightning.training.export import save_hf
from tests.conftest import offline_env


@pytest.fixture(scope="module")
def export(tiny_dir, tmp_path_factory) -> Path:
    """A fresh export of the tiny model, as ``medsft fit`` writes hf_model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    return save_hf(model, AutoTokenizer.from_pretrained(tiny_dir), tmp_path_factory.mktemp("doctor") / "hf_model")


def broken(export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "hf_model"
    shutil.copytree(export, out)
    return out


def failed(folder: Path, generate: bool = False) -> list[str]:
    return [c.name for c in diagnose(folder, generate=generate) if not c.ok]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_a_fresh_export_passes_every_check(export):
    results = diagnose(export)
    assert [c.name for c in results] == ["architectures", "tied embeddings", "eos ids", "chat template",
                                         "think tokens", "dtype", "head_dim", "enable_thinking prompts", "generation"]
    assert all(c.ok for c in results), report(export, results)


def test_eos_ids_removed(export, tmp_path):
    folder = broken(export, tmp_path)
    edit_json(folder / "generation_config.json", lambda g: g.update(eos_token_id=151643))
    assert failed(folder) == ["eos ids"]
    assert "lacks ['<|im_end|>']" in report(folder, diagnose(folder, generate=False))


def test_chat_template_removed(export, tmp_path):
    folder = broken(export, tmp_path)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    edit_json(folder / "tokenizer_config.json", lambda t: t.pop("chat_template", None))
    assert "chat template" in failed(folder)


def test_an_untied_lm_head_that_differs_from_the_embeddings(export, tmp_path):
    folder = broken(export, tmp_path)
    weights = load_file(folder / "model.safetensors")
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    weights["lm_head.weight"] = embed + 0.01  # a stray head beside tie_word_embeddings: true
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert failed(folder) == ["tied embeddings"]
    weights["lm_head.weight"] = embed.clone()  # the same values: harmless
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert failed(folder) == []


def test_an_unsupported_head_dim(export, tmp_path):
    folder = broken(export, tmp_path)
    edit_json(folder / "config.json", lambda c: c.update(head_dim=16))  # the demo model's before it served on vLLM
    assert failed(folder) == ["head_dim"]
    assert "head_dim: 16: vLLM's attention takes" in report(folder, diagnose(folder, generate=False))


def test_dtype_keys_must_name_the_weights_dtype(export, tmp_path):
    folder = broken(export, tmp_path)
    edit_json(folder / "config.json", lambda c: c.pop("torch_dtype"))
    assert failed(folder) == ["dtype"]


@pytest.mark.e2e  # a console-script subprocess
def test_the_command_exits_non_zero_naming_the_check(export, tmp_path, cache_root):
    folder = broken(export, tmp_path)
    edit_json(folder / "generation_config.json", lambda g: g.pop("eos_token_id"))
    cmd = [sys.executable, "-m", "medsft_lightning.cli", "doctor", str(folder), "--no_generate"]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=offline_env(cache_root))
    assert bad.returncode == 1 and "FAIL  eos ids" in bad.stdout and "failed: eos ids" in bad.stdout
    good = subprocess.run([*cmd[:-2], str(export), "--no_generate"], capture_output=True, text=True, timeout=300,
                          env=offline_env(cache_root))
    assert good.returncode == 0 and "8 of 8 checks passed" in good.stdout


def test_the_tiny_model_folder_itself_passes(tiny_dir):
    """``medsft serve medsft:tiny-qwen3`` and ``medsft doctor`` take the demo's base model as it is written."""
    results = diagnose(tiny_dir, generate=False)
    assert all(c.ok for c in results), report(tiny_dir, results)
