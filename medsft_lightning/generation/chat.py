"""A multi-turn chat with a Qwen3 thinking model, shared by ``medsft chat`` (terminal) and ``medsft webchat``.

- The history goes through the tokenizer's own chat template every turn (never hand-built strings), so
  Qwen3's rule holds: earlier turns' thinking is dropped from the prompt, only their answers stay.
- ``enable_thinking`` is the template's switch (``False``: the prompt carries an empty think block).
- Tokens stream as they are decoded (:class:`ReplyStream`), split into the think block and the answer.
- A thinking budget (``max_think_tokens``): after that many think tokens ``</think>`` is forced as the next
  token and the answer follows.
- Decoding: :class:`~medsft_lightning.generation.generate.Generation`, resolved against the model's
  ``generation_config.json`` (Qwen3: temperature 0.6, top-p 0.95, top-k 20); turn ``k`` samples from seed
  ``settings.seed + k``, so two sessions with the same settings (base and fine-tuned) answer alike.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medsft_lightning.data.formatting import THINK_CLOSE, THINK_OPEN
from medsft_lightning.generation.decode import decode
from medsft_lightning.generation.generate import STOP_TOKENS, Generation, left_pad


class Stopped(Exception):
    """Raised inside the decoding loop when the caller's stop event is set (Ctrl-C, a web stop button)."""


@dataclass
class Reply:
    """One assistant turn. ``finish_reason``: ``stop`` (an end token), ``length`` (``max_new_tokens``) or
    ``interrupted`` (stopped by the user); ``forced_think_end``: the thinking budget closed the think block."""

    question: str
    think: str
    answer: str
    finish_reason: str
    enable_thinking: bool
    think_tokens: int
    answer_tokens: int
    seconds: float
    forced_think_end: bool = False
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


class ReplyStream:
    """Splits a growing list of reply tokens into think and answer text, and reports what is new.

    In thinking mode everything before ``</think>`` is the think block (its ``<think>`` tag left out);
    without thinking, everything is the answer. Each token is decoded once: the tokens since the last whole
    character are decoded together and appended to the text when they end in one (Qwen's byte-level BPE
    concatenates), so a reply of n tokens costs O(n) decoding, not O(n²); half a character waits.
    """

    def __init__(self, tokenizer, thinking: bool, on_delta: Callable[[str, str], None] | None = None) -> None:
        self.tokenizer, self.thinking, self.on_delta = tokenizer, thinking, on_delta
        self.tokens: list[int] = []
        self.text, self.pending = "", []  # decoded whole characters; tokens not yet ending in one
        self.shown = {"think": 0, "answer": 0}
        stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        self.stop_ids = set(stops)

    def parts(self) -> tuple[str, str, bool]:
        """``(think, answer, closed)`` of the whole characters so far (stop tokens left out)."""
        if not self.thinking:
            return "", self.text.lstrip("\n"), True
        head, closed, answer = self.text.partition(THINK_CLOSE)
        think = head.split(THINK_OPEN, 1)[-1] if THINK_OPEN in head else head
        return think.strip("\n"), answer.lstrip("\n"), bool(closed)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            return
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=False)
        if piece.endswith("\ufffd"):  # half a character: wait for its other bytes
            return
        self.text += piece
        self.pending = []
        for kind, text in zip(("think", "answer"), self.parts()[:2]):
            if len(text) > self.shown[kind]:
                if self.on_delta is not None:
                    self.on_delta(kind, text[self.shown[kind] :])
                self.shown[kind] = len(text)


class ThinkBudget:
    """The decoding hook of a thinking turn: counts think tokens, forces ``</think>`` after ``budget`` of them,
    and stops the decode when ``stop`` is set. ``budget=None``: no limit."""

    def __init__(self, close_id: int, open_id: int, budget: int | None, thinking: bool,
                 stream: ReplyStream, stop: threading.Event | None) -> None:
        self.close_id, self.open_id, self.budget, self.stream, self.stop = close_id, open_id, budget, stream, stop
        self.in_think, self.count, self.forced = thinking, 0, False

    def __call__(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped
        token, out = int(tokens[0]), None
        if self.in_think and token != self.close_id and token != self.open_id:
            if self.budget is not None and self.count >= self.budget:
                token, self.forced = self.close_id, True
                out = torch.full_like(tokens, token)
            else:
                self.count += 1
        if token == self.close_id:
            self.in_think = False
        self.stream.add(token)
        return out


class ChatSession:
    """A conversation with one model.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer, with the chat template.
        settings: decoding settings (``None``: the model's generation config, else Qwen3's).
        system_prompt: a system message at the start of every prompt (``None``: none).
        enable_thinking: the chat template's switch; ``/think`` and ``/no_think`` flip it between turns.
        max_think_tokens: the thinking budget (``None``: none).
    """

    def __init__(self, model, tokenizer, settings: Generation | None = None, system_prompt: str | None = None,
                 enable_thinking: bool = True, max_think_tokens: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.settings = (settings or Generation()).resolved(getattr(model, "generation_config", None))
        self.system_prompt, self.enable_thinking = system_prompt, enable_thinking
        self.max_think_tokens = max_think_tokens
        self.replies: list[Reply] = []

    def messages(self, question: str) -> list[dict]:
        """The chat so far plus ``question``, as chat-template messages (earlier thinking included: the
        template itself drops it)."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for r in self.replies:
            out += [{"role": "user", "content": r.question},
                    {"role": "assistant", "content": r.answer, "reasoning_content": r.think}]
        return [*out, {"role": "user", "content": question}]

    def prompt_ids(self, question: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages(question), tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=self.enable_thinking)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def ask(self, question: str, on_delta: Callable[[str, str], None] | None = None,
            stop: threading.Event | None = None) -> Reply:
        """Answer ``question``; ``on_delta(kind, text)`` gets each new piece of ``think`` or ``answer`` text as it
        is decoded. A set ``stop`` event ends the answer early (``finish_reason: interrupted``), as does Ctrl-C."""
        s, tok = self.settings, self.tokenizer
        prompt = self.prompt_ids(question)
        stream = ReplyStream(tok, self.enable_thinking, on_delta)
        hook = ThinkBudget(tok.convert_tokens_to_ids(THINK_CLOSE), tok.convert_tokens_to_ids(THINK_OPEN),
                           self.max_think_tokens, self.enable_thinking, stream, stop)
        device = next(self.model.parameters()).device
        ids, mask = left_pad([prompt], tok.pad_token_id, device)
        torch.manual_seed(s.seed + len(self.replies))
        started, finish = time.perf_counter(), None
        try:
            decode(self.model, ids, mask, s.max_new_tokens, sorted(stream.stop_ids), do_sample=s.do_sample,
                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, presence_penalty=s.presence_penalty,
                   repetition_penalty=s.repetition_penalty, on_step=hook)
        except (Stopped, KeyboardInterrupt):
            finish = "interrupted"
        seconds = time.perf_counter() - started
        if finish is None:
            finish = "stop" if stream.tokens and stream.tokens[-1] in stream.stop_ids else "length"
        think, answer, _ = stream.parts()
        close = tok.convert_tokens_to_ids(THINK_CLOSE)
        after = stream.tokens[stream.tokens.index(close) + 1 :] if close in stream.tokens else (
            [] if self.enable_thinking else stream.tokens)
        reply = Reply(question, think.strip(), answer.strip(), finish, self.enable_thinking, think_tokens=hook.count,
                      answer_tokens=len([t for t in after if t not in stream.stop_ids]), seconds=seconds,
                      forced_think_end=hook.forced, prompt_ids=prompt, token_ids=list(stream.tokens))
        self.replies.append(reply)
        return reply

    def reset(self) -> None:
        self.replies.clear()

    def save(self, path: str | Path) -> Path:
        """The transcript as JSONL (:func:`write_transcript`)."""
        return write_transcript(path, self.replies, self.settings)


def write_transcript(path: str | Path, replies: list[Reply], settings: Generation, extra: dict | None = None) -> Path:
    """One JSON line per turn (question, think, answer, finish_reason, token counts, prompt and reply token ids),
    with the decoding settings and ``extra`` (e.g. a served model's URL) in each."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in replies:
            f.write(json.dumps({**asdict(r), "tokens_per_s": round(r.tokens_per_s, 2), **(extra or {}),
                                "settings": asdict(settings)}, ensure_ascii=False) + "\n")
    return out


def read_transcript(path: str | Path) -> list[dict]:
    """The turns :meth:`ChatSession.save` wrote."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
