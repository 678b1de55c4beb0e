"""What ``medsft chat/webchat/compare`` accept as MODEL, and the one-line errors for what they cannot load."""

from __future__ import annotations

import pytest
import torch

from medsft_lightning.hub.tiny import write_tiny_qwen3
from medsft_lightning.tools.models import ModelError, load_model
from medsft_lightning.training.module import MedSFTModule
from tests.test_export import write_checkpoint


def test_a_fit_checkpoint_loads_with_its_trained_weights(tmp_path, tiny_dir):
    module = MedSFTModule(str(tiny_dir))
    module.configure_model()
    with torch.no_grad():
        module.model.model.norm.weight.fill_(0.5)  # "trained": differs from the base folder
    ckpt = write_checkpoint(tmp_path / "best.ckpt", module, model_name_or_path=str(tiny_dir))
    loaded = load_model(str(ckpt))
    assert torch.equal(loaded.model.model.norm.weight, torch.full_like(loaded.model.model.norm.weight, 0.5))
    assert not loaded.model.training and loaded.model.config.use_cache
    assert load_model(str(tiny_dir)).model.model.norm.weight.eq(1).all()  # the folder itself: the base


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path, tiny_dir):
    other = write_tiny_qwen3(tmp_path / "other", hidden_size=32, intermediate_size=64)  # another architecture
    module = MedSFTModule(str(tiny_dir))
    module.configure_model()
    ckpt = write_checkpoint(tmp_path / "x.ckpt", module, model_name_or_path=str(other))
    with pytest.raises(ModelError) as err:
        load_model(str(ckpt))
    message = str(err.value)
    assert message.startswith(f"MODEL={str(ckpt)!r}: {ckpt} (base model {other}")
    assert "do not fit the model" in message and "(151936, 64) in the checkpoint, (151936, 32) in the model" in message


def test_not_a_medsft_checkpoint_and_missing_paths(tmp_path):
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ModelError, match="not a medsft checkpoint"):
        load_model(str(plain))
    with pytest.raises(ModelError, match=r"--compare='runs/x/version_0/hf_model': no such file or folder"):
        load_model("runs/x/version_0/hf_model", flag="--compare")
    with pytest.raises(ModelError, match="holds no config.json"):
        load_model(str(tmp_path))


def test_an_unreachable_hub_id_is_one_clear_error(monkeypatch):
    from medsft_lightning import hub

    def offline(*args, **kwargs):
        raise ConnectionError("no route to modelscope.cn")

    monkeypatch.setattr(hub, "download_model", offline)
    with pytest.raises(ModelError, match=r"MODEL='Qwen/Qwen3-1.7B': not a local file or folder, and fetching it as a "
                                         r"hub id failed \(ConnectionError: no route to modelscope.cn\)"):
        load_model("Qwen/Qwen3-1.7B")
