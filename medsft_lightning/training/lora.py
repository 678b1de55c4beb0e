"""LoRA for small cards (optional extra ``medsft[lora]``, peft): the seed's train_lora.py settings by default."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning.pytorch.utilities import rank_zero_info

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """Low-rank adapters instead of full-parameter training.

    Args:
        r: adapter rank (the seed's LoRA script: 8).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (seed: 32).
        dropout: dropout on the adapter input (seed: 0.1).
        target_modules: Linear layers that get adapters (seed: all seven projections of a Qwen3 layer).
    """

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(SEED_TARGETS))


def apply_lora(model, settings: LoraSettings):
    """Wrap a causal LM with peft adapters (base weights frozen) and log the trainable-parameter count."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # an optional extra
        raise ImportError("model.lora needs peft: pip install 'medsft[lora]'") from err
    config = LoraConfig(task_type="CAUSAL_LM", r=settings.r, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=list(settings.target_modules))
    wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    rank_zero_info(f"[lora] r={settings.r}, alpha={settings.alpha}, dropout={settings.dropout}, "
                   f"{len(settings.target_modules)} target modules: {trainable:,} trainable of {total:,} "
                   f"parameters ({trainable / total:.2%})")
    return wrapped

