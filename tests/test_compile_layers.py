"""``model.compile_layers``: each decoder layer compiled with ``torch.compile`` (Inductor) trains to the same losses.

A 1-layer Qwen3 with a 256-token vocabulary (so Inductor's C++ build on the CPU stays short), fp32, gradient
checkpointing on as in configs/full.yaml; the module's own ``configure_model`` compiles the layer, its own forward
computes the chunked loss, and torch AdamW steps. Compiled kernels fuse operations, so the losses agree to float
rounding, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsft_lightning.training.module import MedSFTModule


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile-model")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=16, intermediate_size=64, vocab_size=256, tie_word_embeddings=True)
                     ).save_pretrained(path)
    return path


def losses(folder, compile_layers: bool) -> list[float]:
    module = MedSFTModule(str(folder), compile_layers=compile_layers, loss_chunk_size=16, learning_rate=1e-2)
    module.configure_model()
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        loss_sum, n, _ = module({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss_sum / n))
    return out


def test_compiled_layers_train_to_the_same_losses(folder):
    torch._dynamo.reset()
    compiled = losses(folder, True)
    module = MedSFTModule(str(folder), compile_layers=True)
    module.configure_model()
    assert module.model.model.layers[0]._compiled_call_impl is not None  # really compiled
    assert compiled == pytest.approx(losses(folder, False), rel=1e-5)
