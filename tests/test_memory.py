"""``medsft memory``: exact parameter counts, byte arithmetic, a real layer's saved tensors, the command."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsft_lightning.tools.memory import (
    GIB,
    QWEN3_ARCHS,
    Arch,
    EstimateError,
    activation_bytes,
    arch_from_config,
    chunked_loss_bytes,
    estimate,
    full_logits_bytes,
    layer_activation_bytes,
    param_count,
    stored_param_count,
)
from medsft_lightning.tools.memory_report import FIELDS, estimate_for, parse, resolve_arch

REPO = Path(__file__).resolve().parents[1]
FULL = str(REPO / "configs" / "full.yaml")
QWEN3_1P7B = QWEN3_ARCHS["Qwen/Qwen3-1.7B"]


def qwen3_config(arch: Arch, **extra) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=arch.hidden_size, num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim, intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings, attention_bias=arch.attention_bias, **extra,
    )


def real_counts(config: Qwen3Config) -> tuple[int, int]:
    """(distinct parameters, state-dict entries) of a real Qwen3ForCausalLM, built on the meta device."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    return sum(p.numel() for p in model.parameters()), sum(t.numel() for t in model.state_dict().values())


def test_param_count_of_the_tiny_model_is_exact():
    from medsft_lightning.hub.tiny import TINY_CONFIG, VOCAB_SIZE

    arch = resolve_arch("medsft:tiny-qwen3")
    params, stored = real_counts(Qwen3Config(vocab_size=VOCAB_SIZE, **TINY_CONFIG))
    assert (param_count(arch), stored_param_count(arch)) == (params, stored) == (9_871_936, 19_595_840)


@pytest.mark.parametrize("bias", [False, True])
def test_param_count_of_an_untied_model_folder_is_exact(tmp_path, bias):
    config = Qwen3Config(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=24, intermediate_size=200, vocab_size=1000, tie_word_embeddings=False,
                         attention_bias=bias)
    config.save_pretrained(tmp_path)
    arch = resolve_arch(str(tmp_path))
    assert not arch.tie_word_embeddings and arch.attention_bias == bias
    params, stored = real_counts(config)
    assert param_count(arch) == stored_param_count(arch) == params == stored


def test_qwen3_1p7b_counts_its_tied_head_once():
    """2,031,739,904 (the published figure) counts lm_head.weight, stored in the files, a second time."""
    params, stored = real_counts(qwen3_config(QWEN3_1P7B))
    assert param_count(QWEN3_1P7B) == params == 1_720_574_976
    assert stored_param_count(QWEN3_1P7B) == stored == 2_031_739_904
    assert stored - params == 151_936 * 2048


@pytest.mark.parametrize("name", sorted(QWEN3_ARCHS))
def test_built_in_table_counts_match_real_models(name):
    arch = QWEN3_ARCHS[name]
    assert (param_count(arch), stored_param_count(arch)) == real_counts(qwen3_config(arch))


@pytest.mark.parametrize(
    ("precision", "weights", "grads", "optimizer", "autocast"),
    [("bf16-true", 2, 2, 4, 0), ("32-true", 4, 4, 8, 0), ("bf16-mixed", 4, 4, 8, 2), ("32", 4, 4, 8, 0)],
)
def test_bytes_per_parameter(precision, weights, grads, optimizer, autocast):
    est = estimate(QWEN3_1P7B, 4, 2048, precision)
    n = 1_720_574_976
    assert (est["weights"], est["gradients"], est["optimizer"], est["autocast_copies"]) == (
        weights * n, grads * n, optimizer * n, autocast * n)


def test_layer_activations_equal_what_a_real_qwen3_layer_saves():
    """Bytes saved for backward by one more decoder layer (saved-tensor hooks, fp32, CPU), per token."""
    arch = Arch(64, 1, 4, 2, 16, 256, 1000, True)
    batch, seq = 2, 32
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))

    def saved(layers: int, mask: torch.Tensor) -> int:
        model = Qwen3ForCausalLM(qwen3_config(replace(arch, num_hidden_layers=layers), attn_implementation="sdpa"))
        params = {p.untyped_storage().data_ptr() for p in model.train().parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        del out
        return sum(storages.values())

    full = torch.ones(batch, seq, dtype=torch.long)
    padded = full.clone()
    padded[1, -5:] = 0
    for mask, is_padded in ((full, False), (padded, True)):
        per_token = (saved(2, mask) - saved(1, mask)) / (batch * seq)
        assert per_token == layer_activation_bytes(arch, "32-true", seq, is_padded) == (7600 if is_padded else 7216)


def test_layer_activation_bytes_of_qwen3_1p7b():
    assert layer_activation_bytes(QWEN3_1P7B, "bf16-true", 2048, padded=False) == 112_808
    assert layer_activation_bytes(QWEN3_1P7B, "bf16-true", 2048, padded=True) == 121_000


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    tokens = 4 * 2048
    ckpt = activation_bytes(QWEN3_1P7B, "bf16-true", 4, 2048, checkpointing=True)
    full = activation_bytes(QWEN3_1P7B, "bf16-true", 4, 2048, checkpointing=False)
    final_norm_and_mask = 6 * 2048 * tokens + tokens * 2048
    assert ckpt == 28 * 2 * 2048 * tokens + 121_000 * tokens + final_norm_and_mask == 2_048_196_608
    assert full == 28 * 121_000 * tokens + final_norm_and_mask == 27_871_936_512
    est = estimate(QWEN3_1P7B, 4, 2048, checkpointing=False)
    assert est["activations"] == full and est["total"] - estimate(QWEN3_1P7B, 4, 2048)["total"] == full - ckpt


def test_chunked_loss_in_bf16_mixed_keeps_fp32_rows():
    """bf16-mixed: fp32 weights (fp32 logits GEMM, no bf16 buffers of the loss's own) and fp32 hidden rows;
    autocast's bf16 copy of each chunk's gradient (c·V·2) for the hidden-state GEMM."""
    tokens, vocab, hidden = 8192, 151_936, 2048
    assert chunked_loss_bytes(QWEN3_1P7B, "bf16-mixed", tokens, 1024) == 1024 * vocab * (4 + 2) + vocab * hidden * 4 + (
        2 * tokens * hidden * 4)


def test_chunked_loss_is_far_below_full_logits():
    tokens, vocab, hidden = 8192, 151_936, 2048
    chunked = chunked_loss_bytes(QWEN3_1P7B, "bf16-true", tokens, 1024)
    assert chunked == 1024 * vocab * (4 + 2) + vocab * hidden * (4 + 2) + 2 * tokens * hidden * 2 == 2_867_593_216
    assert full_logits_bytes(QWEN3_1P7B, "bf16-true", tokens) == tokens * vocab * (2 + 4 + 4) == 12_446_597_120
    assert chunked - chunked_loss_bytes(QWEN3_1P7B, "bf16-true", tokens, 512) == 512 * vocab * 6
    assert chunked_loss_bytes(QWEN3_1P7B, "32-true", tokens, 1024) == 1024 * vocab * 4 + vocab * hidden * 4 + (
        2 * tokens * hidden * 4)


def test_total_adds_the_parts_and_sharding():
    est = estimate(QWEN3_1P7B, 4, 2048)
    n = 1_720_574_976
    assert est["total"] == 8 * n + est["activations_checkpointed"] + est["loss_chunked"]
    assert round(est["total"] / GIB, 2) == 17.40
    ddp = estimate(QWEN3_1P7B, 4, 2048, devices=2)
    assert ddp["strategy"] == "ddp" and ddp["total"] - est["total"] == 2 * n  # DDP's gradient buckets
    fsdp = estimate(QWEN3_1P7B, 4, 2048, devices=4, strategy="fsdp")
    assert (fsdp["weights"], fsdp["optimizer"]) == (2 * n // 4, 4 * n // 4)
    foreach = estimate(QWEN3_1P7B, 1, 16, optimizer="foreach")  # tiny activations: the step temporary dominates
    assert foreach["total"] == 8 * n + 2 * n
    kahan = estimate(QWEN3_1P7B, 4, 2048, optimizer="optimi-triton")  # + the compensation, no step temporary
    norms = 28 * (2 * 2048 + 2 * 128) + 2048  # their compensation is fp32: 2 B more each
    assert kahan["kahan"] == 2 * n + 2 * norms and kahan["total"] == est["total"] + kahan["kahan"]


def test_parse_reads_config_and_flags_win():
    settings, notes = parse(["--config", FULL, "--data.max_length", "4096", "--model.gradient_checkpointing", "false"])
    assert (settings.model, settings.batch_size, settings.max_length, settings.precision) == (
        "Qwen/Qwen3-1.7B", 4, 4096, "bf16-true")
    assert (settings.checkpointing, settings.chunk_size, settings.accumulate, settings.devices) == (False, 512, 2, 1)
    assert settings.resolved == "adamw8bit_sr" and settings.optimizer == "torchao" and not settings.kahan
    assert settings.strategy == "auto" and notes == [] and settings.clip == 1.0
    settings, notes = parse(["--model", "Qwen/Qwen3-0.6B", "--devices", "auto", "--trainer.accelerator", "cpu"])
    assert (settings.model, settings.devices, settings.fused_adamw, settings.precision) == (
        "Qwen/Qwen3-0.6B", 1, True, "32-true")  # MedSFTModule: fused AdamW on CUDA and the CPU
    assert not settings.kahan and settings.optimizer == "fused"
    settings, _ = parse(["--trainer.accelerator", "cpu", "--model.fused_adamw", "false"])
    assert settings.optimizer == "for-loop"  # PyTorch's non-fused AdamW on the CPU
    assert notes == ["trainer.devices='auto': assumed 1 device (pass --devices N)"]


def test_defaults_are_the_modules_defaults():
    from medsft_lightning.data.datamodule import MedicalDataModule
    from medsft_lightning.training.module import MedSFTModule

    for field, (_, default) in FIELDS.items():
        section, key = field.split(".")
        owner = {"model": MedSFTModule, "data": MedicalDataModule}.get(section)
        if owner is not None:
            assert inspect.signature(owner.__init__).parameters[key].default == default, field


def test_resolve_arch_names_and_errors(tmp_path):
    assert resolve_arch("hf://Qwen/Qwen3-4B-Base") == QWEN3_ARCHS["Qwen/Qwen3-4B"]
    with pytest.raises(EstimateError, match="pass a local model folder"):
        resolve_arch("Qwen/Qwen3-999B")
    with pytest.raises(EstimateError, match="has no config.json"):
        resolve_arch(str(tmp_path))
    with pytest.raises(EstimateError, match="only Qwen3"):
        arch_from_config({"model_type": "llama"}, "x/config.json")


def run_memory(args: list[str], module: str = "medsft_lightning.tools.memory_report") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e  # a console-script subprocess
def test_medsft_memory_command_prints_the_estimate():
    proc = run_memory(["memory", "--config", FULL, "--data.batch_size", "2"], module="medsft_lightning.cli")
    assert proc.returncode == 0, proc.stderr
    settings, _ = parse(["--config", FULL, "--data.batch_size", "2"])
    total = estimate_for(QWEN3_1P7B, settings)["total_device"]
    assert "parameters 1,720,574,976 (1.72 B" in proc.stdout
    assert "micro-batch 2 × 2,048 = 4,096 tokens" in proc.stdout
    assert f"{'total':<40}{total / GIB:>8.2f}  GiB per device" in proc.stdout.splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", FULL, "--data.batch_size", "0"], "--data.batch_size='0': use a positive integer"),
        (["--model", "Qwen/Qwen3-999B"], "--model 'Qwen/Qwen3-999B': no such local folder"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--config", "missing.yaml"], "--config missing.yaml: No such file or directory"),
        (["--config", FULL, "--trainer.precision", "64-true"], "--trainer.precision='64-true': not estimated"),
    ],
)
def test_errors_are_one_line(args, message):
    proc = run_memory(args)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("medsft memory: error: ") and message in proc.stderr
