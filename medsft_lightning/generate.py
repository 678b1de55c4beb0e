"""Batched generation with left padding, shared by the generation callbacks and ``medsft predict``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from medsft_lightning.decode import decode
from medsft_lightning.formatting import prompt_messages, split_think_answer
from medsft_lightning.lora import base_model
from medsft_lightning.sharding import is_sharded, unsharded_root

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Generation:
    """Decoding settings.

    Args:
        max_new_tokens: most tokens generated per answer (think block included).
        do_sample: sample instead of greedy decoding (greedy is comparable across steps).
        temperature: sampling temperature (Qwen3's recommendation for thinking mode: 0.6).
        top_p: nucleus sampling mass (Qwen3: 0.95).
        top_k: top-k sampling (Qwen3: 20).
        seed: sampling seed, so repeated runs give the same answers.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    seed: int = 0


@contextmanager
def generation_mode(model, seed: int, root: torch.nn.Module | None = None) -> Iterator[None]:
    """Switch a training model to generation, then restore its training state exactly.

    Inside: ``eval()`` mode, the KV cache on, gradient checkpointing off, and the RNG seeded with ``seed``.
    On exit (errors included): the previous mode, checkpointing, ``config.use_cache`` and the CPU/CUDA RNG
    states come back, so training continues bit-for-bit as if nothing had been generated.

    ``root``: under FSDP2 the sharded root unit (``MedSFTModule.fsdp_root``), unsharded inside (see
    :func:`~medsft_lightning.sharding.unsharded_root`); every rank must then enter and generate the same
    prompts with :func:`generate_batch`.
    """
    was_training, use_cache = model.training, model.config.use_cache
    checkpointing = getattr(model, "is_gradient_checkpointing", False)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        model.eval()
        model.config.use_cache = True
        if checkpointing:
            model.gradient_checkpointing_disable()
        torch.manual_seed(seed)
        with unsharded_root(root):
            yield
    finally:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = use_cache
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def build_prompts(rows: Sequence[Mapping], tokenizer, system_prompt: str | None) -> list[list[int]]:
    """Token ids of each row's prompt: the chat template with the assistant turn opened."""
    texts = tokenizer.apply_chat_template(
        [prompt_messages(r, r.get("system", system_prompt)) for r in rows], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with prompts aligned to the right, as generation needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], settings: Generation) -> list[dict]:
    """Generate for a batch of prompt ids; one dict per prompt, in the given order. An FSDP2 model: every rank
    calls it with the same prompts, inside ``generation_mode(model, seed, root)`` (see :func:`decode`).

    Each dict: ``raw`` (decoded text, special tokens dropped), ``think``, ``answer``, ``well_formed``,
    ``finish_reason`` (``stop`` on ``<|im_end|>``/``<|endoftext|>``, else ``length``),
    ``num_generated_tokens`` (stop token included).
    """
    model = base_model(model)  # a peft wrapper's base model holds the adapters
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    out = decode(model, ids, mask, settings.max_new_tokens, stop_ids, do_sample=settings.do_sample,
                 temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                 sharded=is_sharded(model))
    results = []
    for tokens in out:
        stop_at = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
        kept = tokens if stop_at is None else tokens[: stop_at + 1]
        raw = tokenizer.decode(kept, skip_special_tokens=True)
        think, answer, well_formed = split_think_answer(raw)
        results.append({
            "think": think, "answer": answer, "raw": raw, "well_formed": well_formed,
            "finish_reason": "length" if stop_at is None else "stop", "num_generated_tokens": len(kept),
        })
    return results
