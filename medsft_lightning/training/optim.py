"""The optimizer (``model.optimizer``, chosen in :mod:`~medsft_lightning.training.optim_choice`): PyTorch's AdamW,
torch-optimi's Kahan-compensated AdamW or torchao's 8-bit AdamW with bf16 stochastic rounding
(:mod:`~medsft_lightning.training.optim_lowbit`), optionally stepped inside backward
(:mod:`~medsft_lightning.training.optim_backward`); its LR schedule (:func:`warmup_cosine`).

Why bf16 weights need more than plain AdamW, and what Kahan summation does:

Under ``precision: bf16-true`` the weights, and so AdamW's updates, live in bf16. A bf16 weight near 0.02
has a resolution of ~1.2e-4, and round-to-nearest drops every update smaller than half of that: at
``lr`` 1e-5 only ~16% of such weights move in a step, RMSNorm weights near 1.0 never move, and weight
decay (``1 - lr·wd``) rounds to 1. Kahan summation keeps, per weight, the part of each update that the
rounding lost and adds it back at the next step, so bf16 weights drift as far as fp32 ones would
(``tests/test_optim.py``, ``benchmarks/bf16_updates.py``). It costs one more bf16 tensor per weight
(2 B/param). The implementation is torch-optimi's AdamW (``kahan_sum=True``; foreach on CPU, Triton on
GPU when available), the same update rule as ``torch.optim.AdamW`` otherwise.

One refinement: a bf16 compensation has bf16's 8-bit precision itself, so for weights near 1.0 (RMSNorm)
it cannot hold the ~1e-5 updates either (measured: 0.80 of the fp32 drift at lr 1e-5, none at 2e-6). The
group of 1-D weights (norms, biases: ~0.01% of Qwen3's parameters) therefore keeps its compensation in
fp32 (:class:`KahanAdamW`), which tracks fp32 at every magnitude. Weight decay is applied by optimi
directly to the bf16 weight (not through the compensation): at ``lr·wd`` ~1e-7 per step it rounds away,
as it would be negligible in fp32 too (5e-5 of a weight over a whole run).

fp32 weights (``32-true``, ``bf16-mixed``'s master weights) need no compensation and keep PyTorch's own
(fused) AdamW.

Kahan summation fixes the weights but not the moments: torch-optimi keeps them in the weights' bf16, and a
second moment updated by ``(1 - beta2) = 0.1%`` a step is itself below bf16's resolution, so it drifts (median
1.58x fp32's after 1,000 steps; benchmarks/README.md). torchao's 8-bit moments are recomputed in fp32 every step
from a block-scaled code and stay within a few % of fp32's; with stochastic rounding of the weights that is the
``auto`` choice for bf16 weights (``optim_choice.BF16_DEFAULT``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from medsft_lightning.training import optim_choice

LOW_PRECISION = (torch.bfloat16, torch.float16)


def weights_kind(params: Iterable[torch.Tensor]) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (``optim_choice.weights_of``), from the trainable weights themselves."""
    dtypes = {p.dtype for p in params if p.requires_grad}
    return "bf16" if torch.bfloat16 in dtypes else "fp16" if torch.float16 in dtypes else "fp32"


def build(choice: str, groups: list[dict], lr: float, betas: tuple[float, float], fused: bool | None = None,
          in_backward: bool = False, eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer ``choice`` (resolved: ``adamw``, ``kahan`` or ``adamw8bit_sr``) over parameter ``groups``.

    Args:
        choice: what ``optim_choice.resolve`` returned.
        groups: ``[{"params": [...], "weight_decay": wd}, ...]``.
        lr: learning rate.
        betas: AdamW betas.
        fused: PyTorch's fused kernel (``adamw`` only).
        in_backward: step each parameter inside backward (:class:`~.optim_backward.StepInBackward`).
        eps: AdamW epsilon (torch-optimi's own default is 1e-6, so it is always passed).
    """
    made = []

    def make(parts: list[dict]) -> torch.optim.Optimizer:
        made.append(parts)
        if choice == "adamw8bit_sr":  # one rounding stream per optimizer (per parameter in backward)
            from medsft_lightning.training.optim_lowbit import adamw8bit_sr_class

            return adamw8bit_sr_class()(parts, lr=lr, betas=betas, eps=eps, stream=len(made) - 1)
        return adamw(parts, lr, betas, kahan=choice == "kahan", fused=fused, eps=eps)

    if not in_backward:
        return make(groups)
    from medsft_lightning.training.optim_backward import StepInBackward

    return StepInBackward([{**g, "lr": lr} for g in groups], make)


def adamw(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float],
    kahan: bool,
    fused: bool | None = None,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over parameter ``groups`` (each with its own ``weight_decay``).

    Args:
        groups: ``[{"params": [...], "weight_decay": wd}, ...]``.
        lr: learning rate.
        betas: AdamW betas.
        kahan: Kahan-compensated updates (torch-optimi); otherwise ``torch.optim.AdamW``.
        fused: PyTorch's fused kernel (``kahan=False`` only).
        eps: AdamW epsilon (PyTorch's default; torch-optimi's own default is 1e-6, so it is always passed).
    """
    if not kahan:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
    small = [dict(g, fp32_compensation=True, foreach=False, triton=False) for g in groups
             if g["params"] and all(p.ndim < 2 for p in g["params"])]
    large = [g for g in groups if not (g["params"] and all(p.ndim < 2 for p in g["params"]))]
    # decouple_lr=False: weight decay is lr·wd·w per step, as in torch.optim.AdamW.
    return _kahan_class()(large + small, lr=lr, betas=tuple(betas), eps=eps, kahan_sum=True, decouple_lr=False)


@functools.cache
def _kahan_class() -> type:
    """:class:`KahanAdamW`, defined on first use (importing optimi looks for Triton)."""
    try:
        import optimi
    except ImportError as err:  # a dependency; only a broken install lacks it
        raise ImportError("model.optimizer=kahan needs torch-optimi: pip install torch-optimi") from err

    class KahanAdamW(optimi.AdamW):
        """optimi's Kahan-summed AdamW; groups marked ``fp32_compensation`` keep their compensation in fp32.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype, which
        would turn those fp32 compensations back into bf16 on resume: they are restored from the saved
        values as they were.
        """

        def _init_state(self, group: dict[str, Any], state: dict, param: torch.Tensor) -> None:
            fresh = "kahan_comp" not in state
            super()._init_state(group, state, param)
            if fresh and group.get("fp32_compensation") and param.dtype in LOW_PRECISION:
                state["kahan_comp"] = torch.zeros_like(param, dtype=torch.float32)

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            fp32 = {i: s["kahan_comp"] for i, s in state_dict["state"].items()
                    if isinstance(s.get("kahan_comp"), torch.Tensor) and s["kahan_comp"].dtype == torch.float32}
            super().load_state_dict(state_dict)
            params = [p for group in self.param_groups for p in group["params"]]
            for index, comp in fp32.items():
                self.state[params[index]]["kahan_comp"] = comp.to(params[index].device, copy=True)

    KahanAdamW.__module__ = __name__
    return KahanAdamW


DESCRIPTIONS = {
    "adamw": "torch AdamW, moments in the weights' dtype",
    "kahan": "torch-optimi AdamW + Kahan compensation (+2 B/param; fp32 for 1-D weights), bf16 moments",
    "adamw8bit_sr": "torchao AdamW8bit: block-wise 8-bit moments, bf16 stochastic rounding of the weights",
}


def configure(module) -> dict:
    """``MedSFTModule.configure_optimizers``: decay / no-decay groups (no decay for biases and norm weights), the
    optimizer ``model.optimizer`` resolves to for these weights, and the warmup-cosine LR schedule."""
    hp, trainer = module.hparams, module.trainer
    decay, no_decay = [], []
    for name, param in module.model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    weights = weights_kind(decay + no_decay)
    settings = {"optimizer": hp.optimizer, "kahan_summation": hp.kahan_summation, "fused_adamw": hp.fused_adamw,
                "optimizer_in_backward": hp.optimizer_in_backward}
    problems = optim_choice.problems(settings, {
        "precision": {"bf16": "bf16-true", "fp16": "16-true"}.get(weights, "32-true"),
        "accumulate_grad_batches": getattr(trainer, "accumulate_grad_batches", 1),
        "gradient_clip_val": getattr(trainer, "gradient_clip_val", None), "devices": getattr(trainer, "world_size", 1)})
    if problems:
        raise ValueError("model.optimizer: " + "; ".join(problems))
    choice = optim_choice.resolve(hp.optimizer, weights, hp.kahan_summation)
    if hp.kahan_summation is not None:
        rank_zero_info(f"[optim] model.kahan_summation={hp.kahan_summation} is the old switch: it means "
                       f"model.optimizer={'kahan' if hp.kahan_summation else 'adamw'} (use that instead)")
    fused = hp.fused_adamw if hp.fused_adamw is not None else fused_by_default(module)
    optimizer = build(choice, [{"params": decay, "weight_decay": hp.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=hp.learning_rate, betas=tuple(hp.betas),
                      fused=fused if choice == "adamw" else None, in_backward=hp.optimizer_in_backward)
    rank_zero_info(f"[optim] model.optimizer={hp.optimizer} → {choice} ({DESCRIPTIONS[choice]}) on {weights} weights"
                   + (", stepped per parameter inside backward" if hp.optimizer_in_backward else ""))
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = int(hp.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total, warmup, hp.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def saved_kind(state: dict) -> str | None:
    """Which choice wrote an optimizer ``state_dict`` (``None``: nothing stepped yet, nothing to tell)."""
    from medsft_lightning.training.optim_lowbit import QUANTIZED, ROUNDING_RNG

    entries = list(state.get("state", {}).values())
    if entries and all(set(e) <= {"state", "group", "extra"} for e in entries):  # optimizer_in_backward's layout
        entries = [{**e["state"], **e.get("extra", {})} for e in entries]
    if not entries:
        return None
    keys = set().union(*entries) | set(state)
    marked = any(isinstance(v, dict) and v.get(QUANTIZED) for e in entries for v in e.values())
    return "adamw8bit_sr" if marked or ROUNDING_RNG in keys else "kahan" if "kahan_comp" in keys else "adamw"


def check_resume(module, checkpoint: dict) -> None:
    """Refuse to resume a fit into another ``model.optimizer`` than the one that wrote the checkpoint's state (its
    moments and compensations would be read as something else), with the flag that resumes it."""
    states = checkpoint.get("optimizer_states") or []
    saved = saved_kind(states[0]) if states else None
    if saved is None or module.model is None:
        return
    hp = module.hparams
    now = optim_choice.resolve(hp.optimizer, weights_kind(module.model.parameters()), hp.kahan_summation)
    if saved != now:
        raise ValueError(f"the checkpoint's optimizer state was written by model.optimizer={saved}, this run "
                         f"builds {now}: resume with --model.optimizer {saved} (or start a new run from its weights)")


def fused_by_default(module) -> bool:
    """Fused AdamW on CUDA and CPU, except under ``*-mixed`` precision, whose Lightning plugin refuses gradient
    clipping with an optimizer that unscales inside its step (fused AdamW): full.yaml clips at 1.0."""
    mixed = str(getattr(module._trainer, "precision", "")).endswith("-mixed")
    return module.device.type in ("cuda", "cpu") and not mixed


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
