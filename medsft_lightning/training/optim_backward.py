"""``model.optimizer_in_backward``: each weight is updated, and its gradient freed, inside backward.

PyTorch's pattern (``Tensor.register_post_accumulate_grad_hook``; the "optimizer step in backward" tutorial:
one optimizer per parameter): a hook on every trainable parameter runs once its gradient is complete (a tied
weight: after all its uses), steps that parameter's optimizer and drops the gradient. So only the gradients in
flight exist at once instead of one for every weight (Qwen3-1.7B in bf16: the tied embedding's 0.58 GiB, alive
from the LM head's backward to the embedding's, and one layer's, instead of 3.2 GiB). Each per-parameter
optimizer is the library's own (any ``model.optimizer`` choice), so the weights equal an ordinary step's
(``tests/test_optim_backward.py``).

To Lightning, the LR scheduler and resume, :class:`StepInBackward` is one optimizer with the usual parameter
groups (decay / no decay): LR, betas and weight decay set on a group reach its parameters' optimizers before
their next step, and ``state_dict`` lists per parameter its optimizer's state and group-level counters
(torch-optimi counts steps per group). Such a checkpoint resumes with ``optimizer_in_backward`` on.

What it gives up, each refused with one line (``optim_choice.in_backward_problems``): gradient accumulation over
micro-batches, gradient clipping (by global norm or value: the norm is known only after every weight has
stepped), and several processes (DDP/FSDP average the gradients after the hooks would have stepped). With
``on_nonfinite_loss: skip`` a skipped batch has no backward, so no weight moves, as in an ordinary step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SYNCED = ("lr", "initial_lr", "betas", "beta1", "beta2", "weight_decay", "eps")  # settings a group passes on
PER_PARAMETER = ("step", "setup")  # torch-optimi's group-level step counter, kept per parameter here


class StepInBackward(torch.optim.Optimizer):
    """One optimizer per parameter (``make(group_dicts)`` builds one), stepped by a post-accumulate-grad hook."""

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict]], torch.optim.Optimizer]) -> None:
        # No super().__init__: the groups are built here and the state lives in the per-parameter optimizers.
        self.opts: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self.param_groups: list[dict[str, Any]] = []
        for group in groups:
            params = [p for p in group["params"] if p.requires_grad]
            for p in params:
                self.opts[p] = make([{**group, "params": [p]}])
            template = self.opts[params[0]].param_groups[0] if params else group
            settings = {k: v for k, v in template.items() if k not in ("params", *PER_PARAMETER)}
            self.param_groups.append({**settings, "lr": group["lr"], "params": params})  # a float, for schedulers
        first = next(iter(self.opts.values()), None)
        self.defaults = first.defaults if first is not None else {}
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.opts]

    @property
    def state(self) -> dict[torch.Tensor, dict]:
        """Every parameter's state (the dicts are the per-parameter optimizers' own)."""
        return {p: opt.state[p] for p, opt in self.opts.items() if p in opt.state}

    def _step_one(self, param: torch.Tensor) -> None:
        opt = self.opts[param]
        _sync(opt.param_groups[0], self._group_of[param])
        opt.step()
        param.grad = None

    def step(self, closure=None):
        """The weights were stepped in backward: only run the closure (Lightning's forward + backward)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.opts:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self.opts)}
        state = {}
        for i, (p, opt) in enumerate(self.opts.items()):
            saved = opt.state_dict()
            own = {k: v for k, v in saved["param_groups"][0].items() if k in PER_PARAMETER}
            extra = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}  # e.g. a rounding stream
            state[i] = {"state": saved["state"].get(0, {}), "group": own, **({"extra": extra} if extra else {})}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the checkpoint's optimizer has other parameter groups: it was not written with "
                             "model.optimizer_in_backward on, or not for this model")
        for group, old in zip(self.param_groups, saved):
            group.update({k: v for k, v in old.items() if k != "params"})
        for i, (p, opt) in enumerate(self.opts.items()):
            entry = state_dict["state"][i]
            group = {**opt.param_groups[0], **entry["group"], "params": [0]}
            opt.load_state_dict({"state": {0: entry["state"]} if entry["state"] else {}, "param_groups": [group],
                                 **entry.get("extra", {})})

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __repr__(self) -> str:
        first = next(iter(self.opts.values()), None)
        return f"StepInBackward({len(self.opts)} × {type(first).__name__})"


def _sync(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Copy a group's settings into one parameter's group (a tensor LR, as torchao keeps it, in place)."""
    for key in SYNCED:
        if key in src and key in dst:
            if isinstance(dst[key], torch.Tensor) and not isinstance(src[key], torch.Tensor):
                dst[key].fill_(src[key])
            else:
                dst[key] = src[key]
