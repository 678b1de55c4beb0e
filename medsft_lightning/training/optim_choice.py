"""``model.optimizer``: which AdamW runs, checked before anything is built (no torch here, so that ``medsft
memory`` and the CLI's config check can use it cheaply).

Choices (each a library implementation; the state each keeps per parameter is in ``tools/memory.py``):

- ``adamw``: ``torch.optim.AdamW`` (fused where ``model.fused_adamw`` says). Its moments are in the weights'
  dtype; on bf16 weights its updates are rounded to nearest, so at lr 1e-5 most of them are lost.
- ``kahan``: torch-optimi's AdamW with Kahan summation (bf16 moments, + a compensation per weight). On fp32
  weights there is nothing to compensate, and torch's AdamW runs (as ``model.kahan_summation`` did).
- ``adamw8bit_sr``: torchao's ``AdamW8bit``: both moments block-wise 8-bit (256 values share an fp32
  scale), the update computed in fp32, and bf16 weights written back with stochastic rounding.
- ``auto`` (default): ``adamw8bit_sr`` for bf16 weights (``bf16-true``; the measurements that chose it are in
  benchmarks/README.md), ``kahan`` for fp16 weights (stochastic rounding is bf16-only), ``adamw`` for fp32
  weights (``32-true``, ``bf16-mixed``'s fp32 master weights).

No library offers 8-bit moments together with Kahan-compensated weights (torchao: stochastic rounding only;
torch-optimi: Kahan with moments in the weights' dtype only; bitsandbytes: 8-bit moments, bf16 weights rounded
to nearest), so that combination is not a choice.

``model.kahan_summation`` (before ``model.optimizer``) still works: ``true`` means ``kahan``, ``false`` means
``adamw``; set with another ``model.optimizer`` it is an error naming the replacement.
"""

from __future__ import annotations

import importlib.util

CHOICES = ("auto", "adamw", "kahan", "adamw8bit_sr")
BF16_DEFAULT = "adamw8bit_sr"


def weights_of(precision) -> str:
    """``bf16``, ``fp16`` or ``fp32``: the dtype Lightning's ``trainer.precision`` gives the weights themselves."""
    text = str(precision)
    return {"bf16-true": "bf16", "16-true": "fp16"}.get(text, "fp32")


def resolve(choice: str, weights: str, kahan_summation: bool | None = None) -> str:
    """The optimizer that runs for ``model.optimizer`` on weights of kind ``weights`` (``weights_of``); raises
    ``ValueError`` with the fix for a choice that cannot run (see :func:`problems`)."""
    found = _check(choice, weights, kahan_summation)
    if found[1]:
        raise ValueError("; ".join(found[1]))
    return found[0]


def _check(choice: str, weights: str, kahan_summation: bool | None) -> tuple[str, list[str]]:
    if choice not in CHOICES:
        return "", [f"--model.optimizer={choice!r}: use one of {', '.join(CHOICES)}"]
    if kahan_summation is not None:  # the old switch, before model.optimizer
        old = "kahan" if kahan_summation else "adamw"
        if choice not in ("auto", old):
            return "", [f"--model.kahan_summation={kahan_summation!r} contradicts --model.optimizer={choice!r}: "
                        f"drop model.kahan_summation (replaced by model.optimizer; {kahan_summation!r} meant {old!r})"]
        choice = old
    if choice == "auto":
        return {"bf16": BF16_DEFAULT, "fp16": "kahan"}.get(weights, "adamw"), []
    if choice == "kahan" and weights == "fp32":
        return "adamw", []  # nothing to compensate on fp32 weights
    if choice == "adamw8bit_sr" and weights == "fp16":
        return "", ["--model.optimizer='adamw8bit_sr': stochastic rounding is for bf16 weights; under 16-true "
                    "use kahan (or bf16-true)"]
    return choice, []


def problems(model: dict, trainer: dict) -> list[str]:
    """Every reason the ``model`` / ``trainer`` settings of a config cannot run its optimizer, each naming the
    flag, its value and the fix (the CLI raises them together, before anything is built)."""
    weights = weights_of(trainer.get("precision", "32-true"))
    choice, found = _check(str(model.get("optimizer", "auto")), weights, model.get("kahan_summation"))
    if choice == "adamw8bit_sr" and importlib.util.find_spec("torchao") is None:
        found.append("--model.optimizer='adamw8bit_sr' needs torchao: pip install 'torchao>=0.18'")
    if model.get("fused_adamw") and choice and choice != "adamw":
        found.append(f"--model.fused_adamw=True: PyTorch's fused kernel is torch's AdamW (model.optimizer=adamw); "
                     f"here {choice} runs: leave fused_adamw null")
    if model.get("optimizer_in_backward"):
        found += in_backward_problems(trainer)
    return found


def in_backward_problems(trainer: dict) -> list[str]:
    """Why the optimizer cannot step inside backward with these trainer settings (each parameter is updated,
    and its gradient freed, as soon as its gradient is complete: nothing may need all gradients at once)."""
    found = []
    fix = "model.optimizer_in_backward steps each weight as soon as its gradient is complete"
    accumulate = trainer.get("accumulate_grad_batches") or 1
    if accumulate > 1:
        found.append(f"--trainer.accumulate_grad_batches={accumulate}: {fix}, so gradients cannot accumulate over "
                     "micro-batches; use 1 (a larger data.batch_size) or optimizer_in_backward false")
    clip = trainer.get("gradient_clip_val")
    if clip:
        found.append(f"--trainer.gradient_clip_val={clip}: {fix}, before the global gradient norm is known; "
                     "set gradient_clip_val null, or optimizer_in_backward false")
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes") or 1
    many = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, str)) and "," in str(devices))
    strategy = str(trainer.get("strategy") or "auto").lower()
    if many or nodes > 1 or any(s in strategy for s in ("ddp", "fsdp", "modelparallel", "deepspeed")):
        found.append(f"--trainer.strategy={trainer.get('strategy', 'auto')!r} / devices={devices!r}: {fix}, before "
                     "gradients are averaged across processes; train on one device, or optimizer_in_backward false")
    return found
