"""Exact resume: the RNG state in every checkpoint, the config's optimizer values over the checkpoint's, and
validation (which writes ``last.ckpt``) on optimizer-step boundaries.

Where training stands inside an epoch is kept by the DataModule (``state_dict``: epoch and micro-batches
done; the sampler skips those on resume); the optimizer, LR scheduler and loop counters by Lightning. The
checkpoint files themselves: :mod:`medsft_lightning.training.checkpoints`.
"""

from __future__ import annotations

import random

import torch


def rng_state() -> dict:
    """The Python, torch CPU and CUDA RNG states (saved in every checkpoint by the LightningModule)."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict | None) -> None:
    """Put back what :func:`rng_state` returned (``None``: a checkpoint from before medsft saved it)."""
    if not state:
        return
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sync_optimizer_hparams(optimizer, scheduler, lr: float, betas: tuple[float, float],
                           weight_decays: list[float]) -> list[str]:
    """Put the configured LR, betas and weight decay into an optimizer and LambdaLR restored from a checkpoint.

    Lightning restores the checkpoint's optimizer param groups (``lr``, ``initial_lr``, ``betas``,
    ``weight_decay``) and the scheduler's ``base_lrs``, so a resumed fit would keep the old values whatever
    the config says. Returns what changed, as ``"name: old → new"`` (nothing for a fresh run).
    """
    changes = []
    for group, decay in zip(optimizer.param_groups, weight_decays):
        settings = (("initial_lr", lr), ("betas", tuple(betas)), ("beta1", betas[0]), ("beta2", betas[1]),
                    ("weight_decay", decay))  # torch keeps "betas", torch-optimi "beta1"/"beta2"
        for key, value in settings:
            old = group.get(key)
            old = tuple(old) if isinstance(old, list) else old
            if isinstance(old, torch.Tensor):  # torchao keeps its LR as an fp32 tensor: compare at fp32's precision
                old = float(f"{float(old):.7g}")  # fp32's 7 significant digits
                if abs(old - value) <= 1e-6 * abs(value):
                    continue
            if key in group and old != value:
                changes.append(f"{key}: {old} → {value}")
                group[key] = value
    if scheduler is not None and any(abs(float(b) - lr) > 1e-6 * lr for b in scheduler.base_lrs):
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
            if isinstance(group["lr"], torch.Tensor):  # torchao: its LR stays a tensor, set in place
                group["lr"].fill_(lr * lam(scheduler.last_epoch))
            else:
                group["lr"] = lr * lam(scheduler.last_epoch)
        scheduler._last_lr = [float(g["lr"]) for g in optimizer.param_groups]
    return sorted(set(changes))


def align_val_check(trainer) -> str | None:
    """Move a within-epoch validation interval onto optimizer-step boundaries; a note when it moved it.

    Validation writes ``last.ckpt``. With ``val_check_interval`` 0.25, 542 micro-batches and
    ``accumulate_grad_batches`` 2, Lightning validates every 135 micro-batches, so every other checkpoint
    would land between the two micro-batches of a step (their accumulated gradient is not saved: a resume
    from it is not exact). The interval is rounded down to a multiple of the accumulation (at least one
    step), which keeps the number of validations per epoch. An interval that ends at the epoch's last
    batch is a boundary already (Lightning steps there).
    """
    every, accumulate = trainer.val_check_batch, trainer.accumulate_grad_batches
    if not isinstance(every, int) or accumulate <= 1 or every % accumulate == 0:
        return None
    if every == trainer.num_training_batches:
        return None
    trainer.val_check_batch = max(accumulate, every // accumulate * accumulate)
    return (f"[resume] validation (and its last.ckpt) every {trainer.val_check_batch} micro-batches instead of "
            f"{every}: a multiple of accumulate_grad_batches={accumulate}, so every checkpoint lands on an "
            "optimizer-step boundary")

