"""``medsft eval --scorer generate`` and the thinking-mode checks: replies with a thinking budget, on any engine.

A local model answers in two rounds, the same on every engine that turns prompt ids into new token ids
(:data:`TokenEngine`: this process's :func:`~medsft_lightning.generation.decode.decode`, or vLLM's offline
engine through :class:`~medsft_lightning.generation.vllm_engine.VllmEngine`): first up to ``max_think_tokens``
new tokens; a reply that has not ended then gets ``max_answer_tokens`` more, with ``</think>`` appended first
when its think is still open (``forced_think_end``: the budget cut the thinking, as Qwen3's model card suggests
for a thinking budget). A served model (``--endpoint``) gets the budget as vLLM's ``thinking_token_budget``
and ``max_tokens`` = think + answer budget. Without thinking (``enable_thinking=False``) there is one round of
``max_answer_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from medsft_lightning.data.formatting import THINK_CLOSE, THINK_OPEN
from medsft_lightning.data.mcq_prompt import messages, prompt_ids, render
from medsft_lightning.generation.decode import decode
from medsft_lightning.generation.generate import STOP_TOKENS, Generation, generated_output, generation_mode, left_pad
from medsft_lightning.generation.mcq_answers import extract_letters
from medsft_lightning.generation.wrapped import base_model

# (prompt ids, max new tokens) -> each prompt's new token ids, up to and including its stop token
TokenEngine = Callable[[list[list[int]], int], list[list[int]]]


def _bar(desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", leave=False, disable=None)


def hf_engine(model, tokenizer, settings: Generation, batch_size: int = 8, label: str = "") -> TokenEngine:
    """A :data:`TokenEngine` decoding in this process (batches of similar length, sampling seeded per call)."""
    lm = base_model(model)
    settings = settings.resolved(getattr(lm, "generation_config", None))
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    device = next(lm.parameters()).device

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        with generation_mode(lm, settings.seed), _bar(label, len(prompts)) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ids, mask = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
                new = decode(lm, ids, mask, max_new_tokens, stop_ids, do_sample=settings.do_sample,
                             temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                             presence_penalty=settings.presence_penalty,
                             repetition_penalty=settings.repetition_penalty)
                for i, tokens in zip(chunk, new):
                    out[i] = tokens
                bar.update(len(chunk))
        return out

    return run


def vllm_token_engine(engine, tokenizer, settings: Generation, batch_size: int = 64) -> TokenEngine:
    """A :data:`TokenEngine` on a :class:`~medsft_lightning.generation.vllm_engine.VllmEngine` (``--engine vllm``)."""
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]

    def run(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        limited = replace(settings, max_new_tokens=max_new_tokens)
        out: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            out += engine.generate_ids(prompts[start : start + batch_size], limited, stop_ids)
        return out

    return run


def budgeted(engine: TokenEngine, prompts: list[list[int]], stop_ids: Sequence[int], close_id: int,
             max_think_tokens: int, max_answer_tokens: int, thinking: bool) -> list[tuple[list[int], bool]]:
    """Each prompt's new tokens and whether the budget forced ``</think>`` (see the module docstring)."""
    if not thinking:
        return [(tokens, False) for tokens in engine(prompts, max_answer_tokens)]
    first = engine(prompts, max_think_tokens)
    out = [(tokens, False) for tokens in first]
    todo = [i for i, tokens in enumerate(first) if not any(t in stop_ids for t in tokens)]
    heads = {i: first[i] + ([] if close_id in first[i] else [close_id]) for i in todo}
    more = engine([prompts[i] + heads[i] for i in todo], max_answer_tokens) if todo else []
    for i, extra in zip(todo, more):
        out[i] = (heads[i] + extra, close_id not in first[i])
    return out


class LocalReplier:
    """Replies of a model loaded here (HF or vLLM engine) to questions, in a thinking mode.

    Args:
        tokenizer: the model's tokenizer (its chat template renders the prompts).
        engine: a :data:`TokenEngine`.
        max_think_tokens: the thinking budget.
        max_answer_tokens: tokens for the answer after the think (or for the whole reply without thinking).
    """

    def __init__(self, tokenizer, engine: TokenEngine, max_think_tokens: int, max_answer_tokens: int) -> None:
        self.tokenizer, self.engine = tokenizer, engine
        self.max_think_tokens, self.max_answer_tokens = max_think_tokens, max_answer_tokens
        self.stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        self.close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)

    def reply(self, questions: Sequence[Mapping], mode: str, system_prompt: str | None) -> list[dict]:
        texts = render(self.tokenizer, questions, "generate", system_prompt, mode)
        thinking = mode != "no_think_flag"
        results = budgeted(self.engine, prompt_ids(self.tokenizer, texts), self.stop_ids, self.close_id,
                           self.max_think_tokens, self.max_answer_tokens, thinking)
        out = []
        for text, (tokens, forced) in zip(texts, results):
            reply = generated_output(tokens, self.tokenizer, self.stop_ids)
            if thinking and text.rstrip().endswith(THINK_OPEN):  # a template that opens the think itself
                reply["raw"] = THINK_OPEN + "\n" + reply["raw"]
            out.append({**reply, "forced_think_end": forced})
        return out


class ServedReplier:
    """Replies of a model behind an OpenAI-compatible server (``--endpoint``); same interface as
    :class:`LocalReplier`. The server applies the chat template; ``/no_think`` goes into the user turn."""

    def __init__(self, endpoint, settings: Generation, max_think_tokens: int, max_answer_tokens: int,
                 workers: int = 8) -> None:
        self.endpoint, self.workers, self.max_think_tokens = endpoint, workers, max_think_tokens
        self.settings = replace(settings.resolved(None), max_new_tokens=max_think_tokens + max_answer_tokens)

    def reply(self, questions: Sequence[Mapping], mode: str, system_prompt: str | None) -> list[dict]:
        from medsft_lightning.generation.endpoint import generate_answers

        thinking = mode != "no_think_flag"
        conversations = [messages(q, "generate", system_prompt, no_think=mode == "no_think_switch")
                         for q in questions]
        answers = generate_answers(self.endpoint, conversations, self.settings, workers=self.workers,
                                   thinking=thinking, max_think_tokens=self.max_think_tokens if thinking else None)
        return [{**a, "forced_think_end": thinking and a.get("think_tokens", 0) >= self.max_think_tokens}
                for a in answers]


def score_replies(questions: Sequence[Mapping], replies: Sequence[Mapping], thinking: bool = True) -> list[dict]:
    """Per question: the reply's text and ends, the extracted letters (``chosen``; ``None`` and ``unparseable``
    with the reason when none could be read) and ``correct`` (the letters equal the answer's exactly)."""
    out = []
    for question, reply in zip(questions, replies, strict=True):
        found = extract_letters(reply["raw"], "".join(question["options"]), thinking)
        out.append({"raw": reply["raw"], "finish_reason": reply["finish_reason"],
                    "forced_think_end": reply.get("forced_think_end", False),
                    "num_generated_tokens": reply.get("num_generated_tokens"), "chosen": found.letters,
                    "unparseable": found.reason, "correct": found.letters == question["answer"]})
    return out
