"""Batched generation with left padding, shared by the generation callbacks and ``medsft predict``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from lightning.pytorch.utilities import rank_zero_warn

from medsft_lightning.data.formatting import split_think_answer
from medsft_lightning.generation.decode import decode
from medsft_lightning.generation.wrapped import base_model, is_sharded, unsharded_root

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Qwen3's generation_config.json (thinking mode); its model card warns that greedy decoding repeats endlessly.
QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


@dataclass
class Generation:
    """Decoding settings; a ``null`` sampling field: the model's generation_config.json, else Qwen3's value.

    Only what the model's generation config really sets counts (not transformers' defaults); an explicit value
    always wins. Resolved at generation time (:meth:`resolved`).

    Args:
        max_new_tokens: most tokens generated per answer (think block included); an answer cut off here has
            ``finish_reason: length``.
        do_sample: sample (``true``) or decode greedily (``false``); ``null``: the model's generation config, else
            ``true`` (Qwen3's model card warns that greedy decoding repeats endlessly).
        temperature: sampling temperature; ``null``: the model's generation config, else Qwen3's 0.6.
        top_p: nucleus sampling mass; ``null``: the model's generation config, else Qwen3's 0.95.
        top_k: top-k sampling (0: off); ``null``: the model's generation config, else Qwen3's 20.
        seed: sampling seed: the same seed gives the same answers (for the same prompts and batches).
        presence_penalty: subtracted from the logit of every token already generated in this answer (vLLM/OpenAI
            semantics; 0: off). Qwen3's card suggests 0-2 against endless repetition.
        repetition_penalty: HF/vLLM repetition penalty over the prompt and the generated tokens: a seen token's
            positive logit is divided by it, a negative one multiplied (1: off).
    """

    max_new_tokens: int = 2048
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"generation.repetition_penalty={self.repetition_penalty}: use a value > 0 (1: off)")

    def resolved(self, generation_config=None) -> Generation:
        """A copy with every ``None`` sampling field filled: from ``generation_config`` (a transformers
        ``GenerationConfig``; only the values it sets, as ``to_diff_dict()`` lists them), else from
        :data:`QWEN3_SAMPLING`."""
        diff = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else {}
        filled = {name: diff[name] if diff.get(name) is not None else qwen3 for name, qwen3 in QWEN3_SAMPLING.items()
                  if getattr(self, name) is None}
        return replace(self, **filled)

    def describe(self) -> str:
        """One line for the logs (of resolved settings), e.g. ``sampling (temperature 0.6, top_p 0.95, top_k 20,
        seed 0), max_new_tokens 2048``."""
        text = (f"sampling (temperature {self.temperature}, top_p {self.top_p}, top_k {self.top_k}, seed {self.seed})"
                if self.do_sample else "greedy")
        penalties = [f"{name} {value}" for name, value, off in (("presence_penalty", self.presence_penalty, 0.0),
                                                                ("repetition_penalty", self.repetition_penalty, 1.0))
                     if value != off]
        return text + "".join(f", {p}" for p in penalties) + f", max_new_tokens {self.max_new_tokens}"


def truncation(outputs: Sequence[Mapping]) -> tuple[int, float]:
    """``(count, share)`` of generations cut off at ``max_new_tokens`` (``finish_reason: length``)."""
    count = sum(o["finish_reason"] == "length" for o in outputs)
    return count, count / max(1, len(outputs))


def check_room(settings: Generation, trainer, flag: str) -> None:
    """Warn when ``settings.max_new_tokens`` is below the longest reference completion of the validation rows.

    Reads the encoded validation rows' ``num_supervised`` (the completion's supervised tokens, ``<|im_end|>``
    included; no re-tokenising); does nothing when the datamodule has none. ``flag``: the settings' CLI prefix,
    e.g. ``samples.generation``.
    """
    rows = getattr(getattr(getattr(trainer, "datamodule", None), "val_set", None), "rows", None)
    if not rows:
        return
    lengths = [r["num_supervised"] for r in rows]
    longer = sum(n > settings.max_new_tokens for n in lengths)
    if longer:
        rank_zero_warn(
            f"--{flag}.max_new_tokens={settings.max_new_tokens} is below the longest reference completion of the "
            f"validation rows ({max(lengths)} tokens; {longer} of {len(lengths)} are longer): such answers stop at "
            f"finish_reason: length, often before </think>. Raise --{flag}.max_new_tokens"
        )


@contextmanager
def generation_mode(model, seed: int, root: torch.nn.Module | None = None) -> Iterator[None]:
    """Switch a training model to generation, then restore its training state exactly.

    Inside: ``eval()`` mode, the KV cache on, gradient checkpointing off, and the RNG seeded with ``seed``.
    On exit (errors included): the previous mode, checkpointing, ``config.use_cache`` and the CPU/CUDA RNG
    states come back, so training continues bit-for-bit as if nothing had been generated.

    ``root``: under FSDP2 the sharded root unit (``MedSFTModule.fsdp_root``), unsharded inside (see
    :func:`~medsft_lightning.generation.wrapped.unsharded_root`); every rank must then enter and generate the same
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
    calls it with the same prompts, inside ``generation_mode(model, seed, root)`` (see :func:`decode`). Sampling
    draws from the global RNG, which ``generation_mode`` seeds; ``None`` settings resolve against the model's
    generation config (:meth:`Generation.resolved`).

    Each dict: ``raw`` (decoded text, special tokens dropped), ``think``, ``answer``, ``well_formed``,
    ``finish_reason`` (``stop`` on ``<|im_end|>``/``<|endoftext|>``, else ``length``),
    ``num_generated_tokens`` (stop token included).
    """
    model = base_model(model)  # a peft wrapper's base model holds the adapters
    settings = settings.resolved(getattr(model, "generation_config", None))
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    out = decode(model, ids, mask, settings.max_new_tokens, stop_ids, do_sample=settings.do_sample,
                 temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                 presence_penalty=settings.presence_penalty, repetition_penalty=settings.repetition_penalty,
                 sharded=is_sharded(model))
    return [generated_output(tokens, tokenizer, stop_ids) for tokens in out]


def generated_output(tokens: Sequence[int], tokenizer, stop_ids: Sequence[int]) -> dict:
    """One answer's dict (see :func:`generate_batch`) from its new token ids, cut after the first stop token; also
    what ``medsft predict --engine vllm`` makes of vLLM's tokens."""
    stop_at = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    kept = list(tokens if stop_at is None else tokens[: stop_at + 1])
    raw = tokenizer.decode(kept, skip_special_tokens=True)
    think, answer, well_formed = split_think_answer(raw)
    return {"think": think, "answer": answer, "raw": raw, "well_formed": well_formed,
            "finish_reason": "length" if stop_at is None else "stop", "num_generated_tokens": len(kept)}
