"""Kahan compensation, AdamW step temporaries and disk in ``medsft memory``, against what they really hold.

- a checkpoint: the tiny Qwen3 (real vocabulary, tied head) in bf16, one optimizer step of
  ``optim.adamw`` with gradients set by hand (no bf16 forward on the CPU), then ``torch.save`` of a
  Lightning-like dict (the module's prefixed ``state_dict``, ``optimizer_states``); the file size equals
  ``memory.disk_bytes`` within 64 KiB (pickle and zip records, ~24 KB here; a tied head stored twice would
  be 19 MB more).
- the ``hf_model`` export: ``save_pretrained`` of the same model.
- the step temporaries: peak RSS of a second AdamW step in a fresh process (``tests/memory_probe.py``).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsft_lightning.tools.memory import (
    GIB,
    QWEN3_ARCHS,
    Arch,
    disk_bytes,
    estimate,
    optimizer_step_temp_bytes,
    vector_param_count,
)
from medsft_lightning.tools.memory_report import estimate_for, parse, report, resolve_arch
from medsft_lightning.training import optim
from tests.memory_probe import REPO, run_cases

MIB = 1024**2
FULL = str(REPO / "configs" / "full.yaml")
QWEN3_1P7B = QWEN3_ARCHS["Qwen/Qwen3-1.7B"]
N_1P7B = 1_720_574_976


@pytest.fixture(scope="module")
def tiny_bf16():
    from medsft_lightning.hub.tiny import TINY_CONFIG, VOCAB_SIZE

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB_SIZE, **TINY_CONFIG)).to(torch.bfloat16)


def stepped_optimizer(model, kahan: bool) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = optim.adamw([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                      lr=1e-5, betas=(0.9, 0.999), kahan=kahan, fused=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return opt


@pytest.mark.parametrize("kahan", [True, False])
def test_checkpoint_file_holds_weights_moments_and_compensation(tmp_path, tiny_bf16, kahan):
    module = torch.nn.Module()  # state_dict keys "model.…", as a LightningModule's
    module.model = tiny_bf16
    assert tiny_bf16.lm_head.weight is tiny_bf16.model.embed_tokens.weight
    opt = stepped_optimizer(tiny_bf16, kahan)
    checkpoint = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6", "state_dict": module.state_dict(),
                  "loops": {}, "callbacks": {}, "optimizer_states": [opt.state_dict()], "lr_schedulers": [{}],
                  "hyper_parameters": {"model_name_or_path": "medsft:tiny-qwen3", "kahan_summation": kahan}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    arch = resolve_arch("medsft:tiny-qwen3")
    optimizer = "optimi-for-loop" if kahan else "fused"
    expected = disk_bytes(arch, "bf16-true", optimizer)["checkpoint"]
    # weights + 2 moments in bf16; with Kahan + a compensation, bf16 but fp32 for the 576 norm weights
    assert expected == 9_871_936 * 6 + (9_871_936 * 2 + 576 * 2 if kahan else 0)
    size = os.path.getsize(tmp_path / "last.ckpt")
    assert 0 <= size - expected <= 64 * 1024, (size, expected)
    # The optimizer's states, as the memory estimate counts them (the scalar step counters aside).
    states = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1)
    est = estimate(arch, 1, 16, "bf16-true", optimizer=optimizer)
    assert states == est["optimizer"] + est["kahan"] == expected - 9_871_936 * 2


@pytest.mark.parametrize("bias", [False, True])
def test_vector_param_count_is_the_real_1d_parameters(bias):
    config = Qwen3Config(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=24, intermediate_size=200, vocab_size=1000, attention_bias=bias)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    arch = Arch(96, 3, 6, 2, 24, 200, 1000, False, bias)
    assert vector_param_count(arch) == sum(p.numel() for p in model.parameters() if p.ndim < 2)
    assert vector_param_count(QWEN3_1P7B) == 28 * (2 * 2048 + 2 * 128) + 2048


def test_hf_model_export_holds_the_weights_once(tmp_path, tiny_bf16):
    tiny_bf16.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "model.safetensors")
    expected = disk_bytes(resolve_arch("medsft:tiny-qwen3"), "bf16-true", "optimi-triton")["export"]
    assert expected == 9_871_936 * 2 and 0 <= size - expected <= 64 * 1024, (size, expected)


STEP_ARCH = Arch(256, 2, 4, 2, 64, 1024, 32000, True)  # embedding 8.2 M of 10.2 M parameters: kinds differ
STEP_CASES = [("bfloat16", kind) for kind in ("fused", "for-loop", "foreach", "optimi-for-loop")] + [
    ("float32", "optimi-for-loop")]


@pytest.fixture(scope="module")
def step_measured() -> dict[tuple, int]:
    a = STEP_ARCH
    config = dict(hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers, head_dim=a.head_dim,
                  num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
                  intermediate_size=a.intermediate_size, vocab_size=a.vocab_size, tie_word_embeddings=True)
    cases = [dict(kind="step", config=config, dtype=d, optimizer=o) for d, o in STEP_CASES]
    return {(r["dtype"], r["optimizer"]): r["extra"] for r in run_cases(cases)}


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_optimizer_step_temporaries_are_measured(step_measured, case):
    dtype, kind = case
    expected = optimizer_step_temp_bytes(STEP_ARCH, "bf16-true" if dtype == "bfloat16" else "32-true", kind)
    got = step_measured[case]
    assert abs(got - expected) <= 0.01 * expected + 1 * MIB, (kind, got / MIB, expected / MIB)


def test_full_config_counts_kahan_and_its_optimizer():
    settings, _ = parse(["--config", FULL, "--model.optimizer", "kahan"])
    assert settings.kahan and settings.optimizer == "optimi-triton"  # bf16-true on a GPU
    est = estimate_for(QWEN3_1P7B, settings)
    kahan = 2 * N_1P7B + 2 * vector_param_count(QWEN3_1P7B)  # fp32 compensation of the norm weights
    assert est["kahan"] == kahan and est["optimizer_step_temp"] == 0
    assert est["total"] == 8 * N_1P7B + kahan + est["activations_checkpointed"] + est["loss_chunked"]
    cpu, _ = parse(["--config", FULL, "--model.optimizer", "kahan", "--trainer.accelerator", "cpu"])
    assert cpu.optimizer == "optimi-for-loop"
    assert estimate_for(QWEN3_1P7B, cpu)["optimizer_step_temp"] == 151_936 * 2048 * 2  # the embedding, bf16
    old, _ = parse(["--config", FULL, "--model.optimizer", "auto", "--model.kahan_summation", "false"])
    assert not old.kahan and old.optimizer == "fused" and estimate_for(QWEN3_1P7B, old)["kahan"] == 0
    fp32, _ = parse(["--config", FULL, "--trainer.precision", "32-true", "--model.optimizer", "kahan"])
    assert not fp32.kahan and estimate_for(QWEN3_1P7B, fp32)["kahan"] == 0


def test_full_config_fits_16_gib_with_the_device_allowances():
    settings, _ = parse(["--config", FULL])
    assert settings.resolved == "adamw8bit_sr" and settings.optimizer == "torchao"
    est = estimate_for(QWEN3_1P7B, settings)
    # 8-bit moments: every 2-D tensor (all >= 4,096 values, multiples of 256) as codes + scales + a code map each;
    # the 1-D norm weights keep two bf16 moments.
    matrices = N_1P7B - vector_param_count(QWEN3_1P7B)
    assert est["optimizer"] == 2 * (matrices + matrices // 256 * 4 + (1 + 28 * 7) * 1024) + 4 * vector_param_count(
        QWEN3_1P7B)
    assert est["device"]["cuda_context"] == GIB and est["device"]["slack"] == int(0.05 * est["total"])
    assert est["total_device"] <= 16 * GIB and round(est["total_device"] / GIB, 2) == 15.50
    text = report(QWEN3_1P7B, settings).splitlines()
    assert f"{'total':<40}{est['total_device'] / GIB:>8.2f}  GiB per device" in text
    rows = {line.split()[0]: line.split()[-4:] for line in text if line.startswith("  ") and "B/param" not in line
            and line.split()[0] in ("adamw8bit_sr", "kahan", "adamw")}
    assert rows == {"adamw8bit_sr": ["fits"] * 4, "kahan": ["-", "fits", "fits", "fits"],
                    "adamw": ["-", "fits", "fits", "fits"]}


@pytest.mark.parametrize(("size", "verdict"), [("24GiB", "fits: 15.50 GiB needed, 8.50 GiB to spare."),
                                               ("15GiB", "does NOT fit: 15.50 GiB needed, 0.50 GiB over.")])
def test_device_memory_gives_a_plain_verdict_and_the_fix(size, verdict):
    settings, _ = parse(["--config", FULL, "--device_memory", size])
    text = report(QWEN3_1P7B, settings).splitlines()
    line = next(x for x in text if x.startswith("On "))
    assert line == f"On {float(size[:2]):.2f} GiB (--device_memory {size}): {verdict}"
    if "NOT" in verdict:
        at = text.index(line)  # chunk 256 alone saves 0.23 GiB, not enough; the least invasive fits come first
        assert text[at + 1:at + 4] == ["Any one of these makes it fit:",
                                       "  --data.batch_size 2 --trainer.accumulate_grad_batches 4  (14.46 GiB)",
                                       "  --data.max_length 1024  (14.45 GiB)"]
    kahan, _ = parse(["--config", FULL, "--model.optimizer", "kahan", "--device_memory", "16GiB"])
    text = report(QWEN3_1P7B, kahan).splitlines()
    at = next(i for i, x in enumerate(text) if x.startswith("On "))
    assert "does NOT fit: 22.18 GiB needed" in text[at]
    assert text[at + 2] == "  --model.optimizer adamw8bit_sr  (15.50 GiB)"


def test_disk_of_qwen3_1p7b():
    disk = disk_bytes(QWEN3_1P7B, "bf16-true", "optimi-triton")
    ckpt = 8 * N_1P7B + 2 * vector_param_count(QWEN3_1P7B)
    assert disk == {"checkpoint": ckpt, "export": 2 * N_1P7B, "peak": 3 * ckpt + 2 * N_1P7B}
    assert disk_bytes(QWEN3_1P7B, "bf16-true", "fused")["checkpoint"] == 6 * N_1P7B
    assert disk_bytes(QWEN3_1P7B, "bf16-mixed", "fused")["checkpoint"] == 12 * N_1P7B  # fp32 master weights


def test_report_shows_kahan_row_hint_and_disk():
    settings, _ = parse(["--config", FULL, "--model.optimizer", "kahan"])
    text = report(QWEN3_1P7B, settings).splitlines()
    gib = (2 * N_1P7B + 2 * vector_param_count(QWEN3_1P7B)) / GIB
    assert f"{'Kahan compensation':<40}{gib:>8.2f}  2 B/param (torch-optimi; fp32 for norm weights)" in text
    hint = next(line for line in text if line.startswith("  optimizer adamw8bit_sr "))
    assert hint.endswith("GiB  8-bit moments, stochastic rounding (the bf16 default)")
    assert any(line.startswith("  one checkpoint (.ckpt)") and f"{8 * N_1P7B / GIB:.2f}" in line for line in text)
    assert any(line.startswith("  needed at the peak") and f"{26 * N_1P7B / GIB:.2f}" in line for line in text)
