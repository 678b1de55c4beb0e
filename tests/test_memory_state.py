"""``medsft memory``'s optimizer state per choice equals the bytes the libraries really allocate.

A small Qwen3 whose tensors hit every rule of ``tools/memory_optim.py``: 2-D tensors of >= 4,096 values that are
multiples of 256 (8-bit moments under adamw8bit_sr), a 2-D tensor under 4,096 values and an embedding that is
not a multiple of 256 (both keep plain moments there), 1-D norm weights (fp32 Kahan compensation). Each choice is
built through ``MedSFTModule.configure_optimizers`` on bf16 weights (and fp32 ones), takes two real steps, and the
bytes of every state tensor (``optim_lowbit.state_bytes``: 8-bit codes, scales and code maps included; scalar step
counters left out, as the estimate leaves them out) are summed. The same rules on Qwen3-1.7B's own tensor shapes are
measured by ``benchmarks/optimizer_state_memory.py``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsft_lightning.tools.memory import estimate, param_tensors
from medsft_lightning.tools.memory_settings import resolve_arch
from medsft_lightning.training.module import MedSFTModule
from medsft_lightning.training.optim_lowbit import state_bytes

CONFIG = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
              intermediate_size=200, vocab_size=1001, tie_word_embeddings=True)
STEPS = {"adamw": "fused", "kahan": "optimi-for-loop", "adamw8bit_sr": "torchao-eager"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("state-model")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**CONFIG)).save_pretrained(path)
    return path


def test_the_model_covers_every_rule(folder):
    tensors = param_tensors(resolve_arch(str(folder)))
    assert sum(n for n, _ in tensors) == sum(p.numel() for p in Qwen3ForCausalLM(Qwen3Config(**CONFIG)).parameters())
    two_d = [n for n, dims in tensors if dims == 2]
    assert any(n >= 4096 and n % 256 == 0 for n in two_d)  # quantised
    assert any(n < 4096 for n in two_d) and any(n >= 4096 and n % 256 for n in two_d)  # not quantised
    assert any(dims == 1 for _, dims in tensors)


@pytest.mark.parametrize(("dtype", "precision"), [(torch.bfloat16, "bf16-true"), (torch.float32, "32-true")])
@pytest.mark.parametrize("choice", ["adamw", "kahan", "adamw8bit_sr"])
def test_state_bytes_equal_what_the_optimizer_allocates(folder, choice, dtype, precision):
    module = MedSFTModule(str(folder), optimizer=choice, fused_adamw=False)
    module.model = Qwen3ForCausalLM.from_pretrained(folder, dtype=dtype)

    class Trainer:  # what configure_optimizers reads
        estimated_stepping_batches = 10

    module._trainer = Trainer()
    opt = module.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in module.model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
        opt.step()
    measured = sum(state_bytes(opt.state[p]) for p in module.model.parameters())
    step = STEPS[choice] if not (choice == "kahan" and dtype == torch.float32) else "fused"  # fp32: torch AdamW
    est = estimate(resolve_arch(str(folder)), 1, 16, precision, optimizer=step)
    assert measured == est["optimizer"] + est["kahan"], (measured, est["optimizer"], est["kahan"])
    if choice == "adamw8bit_sr":
        plain = estimate(resolve_arch(str(folder)), 1, 16, precision, optimizer="fused")["optimizer"]
        assert measured < plain  # below torch AdamW's two moments in the weights' dtype
