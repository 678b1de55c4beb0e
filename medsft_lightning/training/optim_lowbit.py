"""``model.optimizer: adamw8bit_sr``: torchao's block-wise 8-bit AdamW with bf16 stochastic rounding.

torchao (``torchao.optim.AdamW8bit``, https://github.com/pytorch/ao) keeps both AdamW moments as 8-bit codes of
a dynamic-tree map, each block of 256 values with one fp32 scale (tensors under 4,096 values, or not a multiple
of 256, keep plain moments in the weights' dtype), computes each update in fp32 from the dequantized moments,
and with ``bf16_stochastic_round`` writes a bf16 weight back rounded up or down with probability given by the
dropped bits: the expected weight is the fp32 one, so updates below bf16's resolution are kept on average.

What medsft adds around the library's optimizer, nothing of the update itself:

- **checkpoints hold plain tensors.** torchao's moments are a tensor subclass, which ``torch.load(weights_only
  =True)`` refuses unless torchao is imported first; ``state_dict`` stores each as its ``codes`` (uint8) and
  ``scale`` (fp32) instead, and ``load_state_dict`` rebuilds them exactly (torch's own ``load_state_dict``
  would cast the uint8 codes to the weights' dtype).
- **its own random stream**: stochastic rounding draws from torch's global generator, which the data loader, a
  resumed run's epoch restart and everything else also draw from, so a resumed run would round differently.
  The step runs on a forked generator whose state (seeded from ``torch.initial_seed()``, so
  ``seed_everything`` fixes it) is kept with the optimizer and saved in its ``state_dict``: resuming rounds
  exactly as the uninterrupted run did (``tests/test_optim_choices.py``), and training draws no global numbers.
- **on the CPU the step runs eagerly**: torchao compiles its per-parameter step with ``torch.compile``, which
  on a CPU means a C++ build per tensor shape (tens of seconds each); the same function
  (``torchao.optim.adam.single_param_adam``) is called uncompiled there. On CUDA torchao's own step runs.
- **quiet import**: torchao 0.18 on a CPU-only torch logs that its CUDA kernels (``_C_mxfp8``, ``_C_cutlass_90a``)
  cannot load and torch logs a deprecation note about enums torchao registers; neither touches the optimizer.
  transformers imports torchao whenever it is installed, so the package's root (``medsft_lightning/__init__.py``)
  drops exactly those lines.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

QUANTIZED = "medsft_8bit"  # marks a moment saved as codes + scale in a state_dict
ROUNDING_RNG = "medsft_rounding_rng"  # the stochastic rounding stream's generator states, in a state_dict


@functools.cache
def torchao_optim():
    """``torchao.optim`` (its CPU-build log noise is filtered by the package root, see the module docstring)."""
    try:
        import torchao.optim
    except ImportError as err:
        raise ImportError("model.optimizer=adamw8bit_sr needs torchao: pip install 'torchao>=0.18'") from err
    return torchao.optim


@functools.cache
def adamw8bit_sr_class() -> type:
    """:class:`AdamW8bitSR`, defined on first use (importing torchao takes seconds)."""
    ao = torchao_optim()
    # torch.compile of torchao's step warns once that its state class has no stable hash for AOT autograd's
    # cache (a cache miss at worst, nothing about the results).
    warnings.filterwarnings("ignore", message="OptimState8bit does not implement _stable_hash_for_caching")
    from torchao.optim.adam import single_param_adam
    from torchao.optim.subclass_8bit import OptimState8bit

    class AdamW8bitSR(ao.AdamW8bit):
        """torchao's ``AdamW8bit(bf16_stochastic_round=True)``; checkpoints as plain tensors, eager on the CPU."""

        compile_on_cpu = False  # benchmarks set it: torchao's compiled step (its CUDA path's code) on the CPU too

        def __init__(self, params, lr: float, betas: tuple[float, float], eps: float = 1e-8, stream: int = 0) -> None:
            super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, bf16_stochastic_round=True)
            self.rounding_rng: dict[str, Any] | None = None  # the stream's generator states, made at the first step
            self.stream = stream

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            cuda = sorted({p.device.index or 0 for g in self.param_groups for p in g["params"] if p.is_cuda})
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                if self.rounding_rng is None:  # only the generators fork_rng puts back are seeded
                    seed = torch.initial_seed() + 7919 * (self.stream + 1)
                    torch.random.default_generator.manual_seed(seed)
                    for index in cuda:
                        torch.cuda.default_generators[index].manual_seed(seed)
                else:
                    torch.set_rng_state(self.rounding_rng["cpu"])
                    for index, state in zip(cuda, self.rounding_rng["cuda"]):
                        torch.cuda.set_rng_state(state, index)
                if cuda or self.compile_on_cpu:
                    super().step()
                else:
                    self._eager_step()
                self.rounding_rng = {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(i) for i in cuda]}
            return loss

        def _eager_step(self) -> None:
            for group in self.param_groups:  # torchao's own loop (adam.py), without torch.compile
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    rounding = self.bf16_stochastic_round and p.dtype is torch.bfloat16
                    single_param_adam(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None,
                                      group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                      group["eps"], self.is_adamw, rounding)

        def state_dict(self) -> dict[str, Any]:
            out = super().state_dict()
            out["state"] = {index: {k: _packed(v) for k, v in s.items()} for index, s in out["state"].items()}
            if self.rounding_rng is not None:
                out[ROUNDING_RNG] = dict(self.rounding_rng)
            return out

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            state_dict = dict(state_dict)
            rng = state_dict.pop(ROUNDING_RNG, None)
            self.rounding_rng = {"cpu": rng["cpu"].clone(), "cuda": [t.clone() for t in rng["cuda"]]} if rng else None
            packed = {i: {k: v for k, v in s.items() if isinstance(v, dict) and v.get(QUANTIZED)}
                      for i, s in state_dict["state"].items()}
            plain = {i: {k: v for k, v in s.items() if k not in packed[i]} for i, s in state_dict["state"].items()}
            super().load_state_dict({**state_dict, "state": plain})
            params = [p for group in self.param_groups for p in group["params"]]
            for index, moments in packed.items():
                param = params[index]
                for key, saved in moments.items():
                    self.state[param][key] = _unpacked(saved, param)

    def _packed(value):
        if not isinstance(value, OptimState8bit):
            return value
        return {QUANTIZED: True, "codes": value.codes, "scale": value.scale, "signed": value.signed}

    def _unpacked(saved: dict, param: torch.Tensor):
        template = OptimState8bit.zeros(saved["codes"].shape, saved["signed"], saved["codes"].numel()
                                        // saved["scale"].numel(), param.device, dtype=param.dtype)
        template.codes.copy_(saved["codes"])
        template.scale.copy_(saved["scale"])
        return template

    AdamW8bitSR.__module__ = __name__
    return AdamW8bitSR


def state_bytes(state: dict) -> int:
    """Bytes of one parameter's optimizer state tensors (8-bit moments: codes + scales + their code map);
    scalar step counters are left out, as ``medsft memory`` leaves them out."""
    total = 0
    for value in state.values():
        parts = [getattr(value, name) for name in ("codes", "scale", "qmap")] if hasattr(value, "codes") else [value]
        total += sum(t.nbytes for t in parts if isinstance(t, torch.Tensor) and t.numel() > 1)
    return total
