"""A lean batched decoding loop: KV cache, left padding, and finished rows leave the batch.

``model.generate`` keeps every row in the batch until the last one stops and runs a general-purpose
pipeline of logits processors and stopping criteria at every step. For answering many questions this
loop does only what our decoding needs: one forward pass of the decoder per new token over the rows
still generating (their KV cache rows selected with ``reorder_cache``), the LM head on the last
position only, optional vLLM-style presence/repetition penalties (:class:`Penalties`), then greedy ``argmax``
or Qwen3-style sampling (temperature, top-k, top-p). Greedy output equals ``model.generate``'s (tested).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch


def pick_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from ``[rows, vocab]`` logits: argmax, or a sample after temperature/top-k/top-p.

    Top-p keeps the smallest set of the top-k tokens whose probability reaches ``top_p`` (the most
    likely token always stays), as ``transformers``' warpers do.
    """
    if not do_sample:
        return logits.max(dim=-1).indices
    k = min(top_k, logits.shape[-1]) if top_k and top_k > 0 else logits.shape[-1]
    values, indices = logits.topk(k, dim=-1)  # sorted, largest first; the temperature keeps the order
    probs = (values.float() / max(temperature, 1e-5)).softmax(dim=-1)  # k values scaled, not the whole vocabulary
    if 0 < top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return indices.gather(-1, choice).squeeze(-1)


def penalize(logits: torch.Tensor, context: torch.Tensor, generated: torch.Tensor, presence_penalty: float,
             repetition_penalty: float) -> torch.Tensor:
    """Apply vLLM's penalties in place to ``[rows, vocab]`` logits and return them.

    ``repetition_penalty`` (HF/vLLM) on every token in a row's ``context`` (prompt and generated ids): a positive
    logit is divided by it, a negative one multiplied; then ``presence_penalty`` (OpenAI/vLLM) is subtracted from
    every token in ``generated``. A token seen several times is penalised once (a presence, not a frequency).
    ``context``/``generated``: ``[rows, n]`` token ids (``n`` may be 0); duplicates are harmless.
    """
    if repetition_penalty != 1.0 and context.shape[1]:
        seen = logits.gather(1, context)
        logits.scatter_(1, context, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if presence_penalty != 0.0 and generated.shape[1]:
        logits.scatter_(1, generated, logits.gather(1, generated) - presence_penalty)
    return logits


class Penalties:
    """Per-row state of :func:`penalize` through a decode: each row's prompt (padding left out) and its tokens
    so far, kept aligned with the rows still generating (:meth:`keep`)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 presence_penalty: float, repetition_penalty: float) -> None:
        self.presence, self.repetition = presence_penalty, repetition_penalty
        # Padding becomes a copy of the row's last prompt token (real under left padding): penalised once anyway.
        self.prompt = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])
        self.generated = input_ids.new_zeros(input_ids.shape[0], max_new_tokens)
        self.steps = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        generated = self.generated[:, : self.steps]
        context = torch.cat([self.prompt, generated], dim=1) if self.repetition != 1.0 else generated[:, :0]
        return penalize(logits, context, generated, self.presence, self.repetition)

    def record(self, tokens: torch.Tensor) -> None:
        self.generated[:, self.steps] = tokens
        self.steps += 1

    def keep(self, index: torch.Tensor) -> None:
        self.prompt, self.generated = self.prompt[index], self.generated[index]


class LastTokenHead:
    """The LM head on the last position, computed as ``weight @ hidden.T`` into one reused buffer.

    Decoding needs ``[rows, vocab]`` logits for a handful of rows. On CPU, ``F.linear`` (``hidden @
    weight.T``) with 8 rows and a 151,936-row weight takes ~2x as long as ``weight @ hidden.T``, and a
    fresh 5 MB logits tensor per token costs page faults; together they were most of a decoding step
    (``benchmarks/predict_throughput.py``). Returns a ``[rows, vocab]`` view of the buffer, valid until
    the next call.
    """

    def __init__(self, head: torch.nn.Module, rows: int):
        self.weight, self.bias = head.weight.detach(), getattr(head, "bias", None)
        self.buffer = self.weight.new_empty(self.weight.shape[0] * rows)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        out = self.buffer[: self.weight.shape[0] * rows].view(self.weight.shape[0], rows)
        torch.mm(self.weight, hidden.to(self.weight.dtype).t(), out=out)
        logits = out.t()
        return logits if self.bias is None else logits + self.bias


# (indices of the rows still generating, their new tokens) -> replacement tokens or None
OnStep = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def _cache_kwarg(decoder) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _without_grad(fn):
    """``inference_mode`` around ``fn``; for a ``sharded=True`` call ``no_grad`` (inference mode off, even inside
    an outer one): FSDP2 keeps a layer's all-gather buffers for later gathers, and a buffer first allocated
    under inference mode cannot be written by training afterwards ("Inplace update to inference tensor")."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not kwargs.get("sharded"):
            with torch.inference_mode():
                return fn(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@_without_grad
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           stop_ids: Sequence[int], do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, *, presence_penalty: float = 0.0, repetition_penalty: float = 1.0,
           sharded: bool = False, on_step: OnStep | None = None) -> list[list[int]]:
    """New tokens for each left-padded row, up to and including its first stop token.

    Args:
        model: a causal LM (``eval()`` mode) with ``get_decoder()`` and ``get_output_embeddings()``.
        input_ids: ``[rows, width]`` prompts aligned to the right (left padding).
        attention_mask: ``[rows, width]``, 0 on the padding.
        max_new_tokens: most tokens generated per row.
        stop_ids: token ids that end a row (kept as its last token).
        do_sample, temperature, top_k, top_p: see :func:`pick_tokens`.
        presence_penalty, repetition_penalty: see :func:`penalize` (0 and 1: off, at no cost).
        sharded: an FSDP2 model that every rank decodes in lockstep on the same prompts (its root unit
            unsharded by the caller): ``no_grad`` instead of ``inference_mode``, and each step's tokens are
            rank zero's (a broadcast), so all ranks stop at the same steps and run the same forwards.
        on_step: called after each step's tokens are picked, with the original indices of the rows still
            generating and their ``[rows]`` tokens; it may return replacement tokens (a forced ``</think>``),
            and an exception it raises ends the decode (a chat's stop button). Streaming reads tokens here.
    """
    from transformers import DynamicCache

    rows = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    if max_new_tokens < 1:
        return out
    decoder, head = model.get_decoder(), LastTokenHead(model.get_output_embeddings(), rows)
    kv_cache = DynamicCache(config=model.config)
    cache = {_cache_kwarg(decoder): kv_cache, "use_cache": True}
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **cache)
    logits = head(hidden.last_hidden_state[:, -1])
    alive = torch.arange(rows)  # which original rows are still generating, in batch order
    stops = torch.tensor(list(stop_ids), device=input_ids.device)
    next_pos, mask = positions[:, -1:] + 1, attention_mask
    penalties = (Penalties(input_ids, attention_mask, max_new_tokens, presence_penalty, repetition_penalty)
                 if presence_penalty != 0.0 or repetition_penalty != 1.0 else None)
    for step in range(max_new_tokens):
        tokens = pick_tokens(logits if penalties is None else penalties(logits), do_sample, temperature, top_k, top_p)
        if sharded:  # identical on every rank anyway, unless kernels are not bitwise deterministic
            torch.distributed.broadcast(tokens, src=0)
        if on_step is not None:
            forced = on_step(alive, tokens)
            tokens = tokens if forced is None else forced
        if penalties is not None:
            penalties.record(tokens)
        for row, token in zip(alive.tolist(), tokens.tolist()):
            out[row].append(token)
        running = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not running.any():
            break
        if not running.all():  # finished rows leave the batch, and their cache rows with them
            keep = running.nonzero().squeeze(-1)
            kv_cache.reorder_cache(keep)
            alive, tokens, mask, next_pos = alive[keep.cpu()], tokens[keep], mask[keep], next_pos[keep]
            if penalties is not None:
                penalties.keep(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        hidden = decoder(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, **cache)
        logits = head(hidden.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    return out
