"""A model in training as generation must see it: through a peft wrapper and through FSDP2's units.

Generation runs on the model being trained (samples and generation metrics at validation, ``predict_step``),
so it has to look through what training wraps around a transformers causal LM. Under LoRA the adapters live
in the layers of the peft wrapper's base model (:func:`base_model`). Under FSDP2 (``fully_shard``) a
forward is a collective of all ranks (:func:`is_sharded`), and the root unit's parameters (embeddings,
final norm, tied LM head) are gathered only inside its own forward, while generation reads the head outside
it (:func:`unsharded_root`). Training builds these wrappers and imports :func:`base_model` from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def base_model(model):
    """The causal LM inside a peft wrapper (its layers hold the adapters), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 units (``fully_shard``): then its forward is a collective of all ranks."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def unsharded_root(root: nn.Module | None) -> Iterator[None]:
    """The root unit's parameters (embeddings, final norm, tied LM head) gathered for use outside its forward,
    as generation needs them; resharded on exit. A collective: every rank enters it. The decoder layers still
    gather themselves in their own forwards. ``root=None`` (not sharded): nothing to do."""
    if root is None:
        yield
        return
    # FSDP2 makes the first unit to run forward the root of all; generation can come before any training
    # forward (the baseline round), and a decoder layer must not become the root then.
    root._get_fsdp_state()._lazy_init()  # no-op once a forward has run
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
