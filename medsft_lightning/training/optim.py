"""The optimizer: AdamW, with Kahan-compensated updates when the weights themselves are bf16/fp16; its LR
schedule (:func:`warmup_cosine`).

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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def low_precision(params: Iterable[torch.Tensor]) -> bool:
    """Whether any trainable weight is stored in bf16 or fp16."""
    return any(p.dtype in LOW_PRECISION for p in params if p.requires_grad)


def use_kahan(kahan_summation: bool | None, params: Iterable[torch.Tensor]) -> bool:
    """``model.kahan_summation``: on (``None`` or ``True``) for bf16/fp16 weights; fp32 weights (``32-true``,
    ``bf16-mixed``) have nothing to compensate and keep PyTorch's AdamW either way; ``False``: off."""
    return kahan_summation is not False and low_precision(params)


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
        raise ImportError("model.kahan_summation needs torch-optimi: pip install torch-optimi") from err

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


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
