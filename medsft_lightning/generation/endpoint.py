"""Talking to a running OpenAI-compatible server (``medsft serve``, any vLLM) instead of loading the model.

``--endpoint URL`` in ``medsft chat``, ``webchat`` and ``compare`` comes here. The server applies the model's own
chat template, so requests carry plain messages: the system prompt, earlier turns (the assistant's answer as
``content``; its thinking is not sent, as Qwen3's template would drop it anyway) and the new question.

- URL: ``http://host:8000`` (``/v1`` is added to a URL without a path) or a full base URL ending in ``/v1``.
- Thinking: with vLLM's ``--reasoning-parser qwen3`` the think text arrives as ``reasoning`` (older servers:
  ``reasoning_content``), the answer as ``content``; ``chat_template_kwargs.enable_thinking`` switches it.
- Thinking budget: vLLM's ``thinking_token_budget`` (0.32: needs ``--reasoning-parser``, which ``medsft serve``
  passes; counted from a ``<think>`` token, which Qwen3 writes first); ``forced_think_end`` is inferred (the
  think block used the whole budget). A server without a reasoning parser sends the tags inside ``content``.
- Decoding: :class:`~medsft_lightning.generation.generate.Generation`, its unset fields filled with Qwen3's
  values (the server's generation config cannot be read) and sent explicitly: temperature/top_p/seed/max_tokens/
  presence_penalty, vLLM's ``top_k``/``repetition_penalty`` in the body; greedy is temperature 0. Turn ``k``
  uses seed ``settings.seed + k``, as :class:`~medsft_lightning.generation.chat.ChatSession` does.
- Token counts come from the server's ``usage``: ``completion_tokens``, and the think share from
  ``completion_tokens_details.reasoning_tokens`` when reported (vLLM with a reasoning parser), else from the
  share of streamed pieces (not streamed: of characters) that were thinking; the answer gets the rest, less
  the ``<think>``/``</think>`` tags and the stop token. A stopped stream has no usage: each streamed piece
  counts as one token.
- The API key goes only into the ``Authorization`` header: never logged, never in a saved transcript.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from medsft_lightning.data.formatting import THINK_CLOSE, THINK_OPEN, split_think_answer
from medsft_lightning.generation.chat import Reply, write_transcript
from medsft_lightning.generation.generate import Generation

logger = logging.getLogger(__name__)
NO_OPENAI = "--endpoint needs the openai package: pip install 'medsft[client]'"


class EndpointError(RuntimeError):
    """The server cannot be used: unreachable, it refused the request or the key, or it lacks the model."""


@dataclass
class EndpointReply(Reply):
    """A :class:`Reply` from a server: no token ids (the server keeps them), the counts from its ``usage``."""

    completion_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def api_base(url: str, flag: str = "--endpoint") -> str:
    """The client's base URL: ``url`` without a trailing ``/``, with ``/v1`` added when it has no path."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointError(f"{flag}={url!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    return url if parts.path else url + "/v1"


@dataclass
class Endpoint:
    """One served model: ``url`` as given, ``model`` its served name, ``flag`` where it came from (for errors)."""

    url: str
    model: str
    flag: str
    client: object = field(repr=False)

    def create(self, **request):
        """``chat.completions.create`` with the client's errors turned into one :class:`EndpointError` line."""
        try:
            return self.client.chat.completions.create(model=self.model, **request)
        except Exception as err:
            raise self.error(err) from None

    def error(self, err: BaseException) -> BaseException:
        import openai

        if isinstance(err, openai.AuthenticationError):
            return EndpointError(f"{self.flag}={self.url}: the server refused the API key (HTTP 401); give "
                                 "--api_key or set OPENAI_API_KEY")
        if isinstance(err, openai.APIStatusError):
            body = err.body.get("message", err.body) if isinstance(err.body, dict) else err.body or err.message
            return EndpointError(f"{self.flag}={self.url}: the server refused the request (HTTP "
                                 f"{err.status_code}: {str(body).strip()[:300]})")
        if isinstance(err, openai.APIError) or type(err).__module__.startswith(("httpx", "httpcore")):
            why = str(err.__cause__ or err.__context__ or err).strip().splitlines() or [type(err).__name__]
            return EndpointError(f"{self.flag}={self.url}: cannot reach it ({why[0]})")
        return err


def connect(url: str, api_key: str | None = None, served_model: str | None = None, *, flag: str = "--endpoint",
            model_flag: str = "--served_model", timeout: float = 600.0) -> Endpoint:
    """Open ``url`` and find the model to ask: ``served_model``, else the first ``/v1/models`` lists.

    Args:
        api_key: sent as ``Authorization: Bearer``; ``None``: ``$OPENAI_API_KEY``, else ``EMPTY`` (vLLM without
            ``--api-key`` accepts any).
        timeout: seconds to wait for a response or the next streamed piece (connecting: 10 s).
    """
    try:
        import openai
    except ImportError:
        raise EndpointError(NO_OPENAI) from None
    for name in ("httpx", "httpx2", "openai"):  # their INFO lines would clutter the chat
        logging.getLogger(name).setLevel(logging.WARNING)
    client = openai.OpenAI(base_url=api_base(url, flag), api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                           max_retries=0, timeout=openai.Timeout(timeout, connect=10.0))
    endpoint = Endpoint(url, served_model or "", flag, client)
    try:
        names = [m.id for m in client.models.list()]
    except openai.NotFoundError:  # a server without /v1/models: trust the name given
        names = None
    except Exception as err:
        raise endpoint.error(err) from None
    if served_model is None and not names:
        raise EndpointError(f"{flag}={url}: /v1/models lists no model (give {model_flag} NAME)")
    if served_model is not None and names is not None and served_model not in names:
        raise EndpointError(f"{model_flag}={served_model!r}: {url} serves {', '.join(names) or 'no model'}")
    endpoint.model = served_model or names[0]
    return endpoint


def request_params(settings: Generation, seed: int, thinking: bool, max_think_tokens: int | None = None) -> dict:
    """The ``chat.completions.create`` keywords for ``settings`` (resolved), as the module docstring maps them."""
    s = settings
    params: dict = {"max_tokens": s.max_new_tokens, "seed": seed, "presence_penalty": s.presence_penalty}
    extra: dict = {"chat_template_kwargs": {"enable_thinking": thinking}, "repetition_penalty": s.repetition_penalty}
    if s.do_sample:
        params.update(temperature=s.temperature, top_p=s.top_p)
        extra["top_k"] = s.top_k
    else:
        params["temperature"] = 0.0
    if thinking and max_think_tokens is not None:
        extra["thinking_token_budget"] = max_think_tokens
    return {**params, "extra_body": extra}


def _reasoning(part) -> str | None:
    return getattr(part, "reasoning", None) or getattr(part, "reasoning_content", None)


def split_counts(usage, thinking: bool, think_share: float, finish: str, closed: bool) -> tuple[int, int, int]:
    """``(think, answer, completion)`` tokens from the server's ``usage`` (see the module docstring)."""
    completion = usage.completion_tokens or 0
    details = getattr(usage, "completion_tokens_details", None)
    reported = getattr(details, "reasoning_tokens", None)
    overhead = ((1 + closed) if thinking and completion else 0) + (finish == "stop")  # <think>, </think>, stop
    if not thinking:
        think = 0
    elif reported or (reported == 0 and think_share == 0):
        think = reported
    else:
        think = round(max(0, completion - overhead) * think_share)
    return think, max(0, completion - think - overhead), completion


class EndpointSession:
    """A conversation with a served model, with :class:`~medsft_lightning.generation.chat.ChatSession`'s interface.

    Args:
        endpoint: from :func:`connect`.
        settings: decoding (unset fields: Qwen3's values).
        system_prompt: a system message first in every request (``None``: none).
        enable_thinking: ``chat_template_kwargs.enable_thinking``; ``/think`` and ``/no_think`` flip it.
        max_think_tokens: the thinking budget (vLLM's ``thinking_token_budget``; ``None``: none).
    """

    def __init__(self, endpoint: Endpoint, settings: Generation | None = None, system_prompt: str | None = None,
                 enable_thinking: bool = True, max_think_tokens: int | None = None) -> None:
        self.endpoint = endpoint
        self.settings = (settings or Generation()).resolved(None)
        self.system_prompt, self.enable_thinking = system_prompt, enable_thinking
        self.max_think_tokens = max_think_tokens
        self.replies: list[EndpointReply] = []

    @property
    def label(self) -> str:
        return f"{self.endpoint.model} @ {self.endpoint.url}"

    def messages(self, question: str) -> list[dict]:
        """The request's messages: system, earlier questions and answers (no thinking), then ``question``."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for r in self.replies:
            out += [{"role": "user", "content": r.question}, {"role": "assistant", "content": r.answer}]
        return [*out, {"role": "user", "content": question}]

    def ask(self, question: str, on_delta: Callable[[str, str], None] | None = None,
            stop: threading.Event | None = None) -> EndpointReply:
        """Answer ``question``, streaming; ``on_delta(kind, text)`` gets each new piece of ``think`` or ``answer``.
        A set ``stop`` (checked at each streamed piece) or Ctrl-C closes the stream: ``finish_reason: interrupted``.
        """
        thinking = self.enable_thinking
        params = request_params(self.settings, self.settings.seed + len(self.replies), thinking, self.max_think_tokens)
        text, pieces = {"think": "", "answer": ""}, {"think": 0, "answer": 0}
        finish, usage, stream, started = None, None, None, time.perf_counter()
        try:
            stream = self.endpoint.create(messages=self.messages(question), stream=True,
                                          stream_options={"include_usage": True}, **params)
            for chunk in stream:
                if stop is not None and stop.is_set():
                    finish = "interrupted"
                    break
                usage = chunk.usage or usage
                for choice in chunk.choices[:1]:
                    for kind, piece in (("think", _reasoning(choice.delta)), ("answer", choice.delta.content)):
                        piece = piece.lstrip("\n") if piece and not text[kind] else piece
                        if piece:
                            text[kind] += piece
                            pieces[kind] += 1
                            if on_delta is not None:
                                on_delta(kind, piece)
                    finish = choice.finish_reason or finish
        except KeyboardInterrupt:
            finish = "interrupted"
        except EndpointError:
            raise
        except Exception as err:  # the connection broke mid-stream
            raise self.endpoint.error(err) from None
        finally:
            if stream is not None:
                stream.close()
        seconds = time.perf_counter() - started
        finish = finish or "interrupted"  # the stream ended without a finish_reason
        if usage is not None and finish != "interrupted":
            share = pieces["think"] / max(1, pieces["think"] + pieces["answer"])
            think_n, answer_n, completion = split_counts(usage, thinking, share, finish, bool(text["answer"]))
        else:
            think_n, answer_n = pieces["think"], pieces["answer"]
            completion = think_n + answer_n
        budget = self.max_think_tokens if thinking else None
        if budget is not None and think_n > budget + 2:
            logger.warning("%s: %d think tokens despite a budget of %d: the server did not apply "
                           "thinking_token_budget (vLLM: needs --reasoning-parser, counts from a <think> token)",
                           self.label, think_n, budget)
        reply = EndpointReply(question, text["think"].strip(), text["answer"].strip(), finish, thinking,
                              think_tokens=think_n, answer_tokens=answer_n, seconds=seconds,
                              forced_think_end=budget is not None and think_n >= budget, completion_tokens=completion,
                              prompt_tokens=getattr(usage, "prompt_tokens", None))
        self.replies.append(reply)
        return reply

    def reset(self) -> None:
        self.replies.clear()

    def save(self, path: str | Path) -> Path:
        """The transcript as JSONL (as :meth:`ChatSession.save <medsft_lightning.generation.chat.ChatSession.save>`
        writes it, with the endpoint's URL and served model; never the API key)."""
        where = {"endpoint": self.endpoint.url, "served_model": self.endpoint.model}
        return write_transcript(path, self.replies, self.settings, where)


def answer_one(endpoint: Endpoint, messages: list[dict], settings: Generation, thinking: bool = True,
               max_think_tokens: int | None = None) -> dict:
    """One non-streamed answer as :func:`~medsft_lightning.generation.generate.generate_batch` returns it (``raw``
    rebuilt as ``<think>…</think>`` + answer), plus ``think_tokens``/``answer_tokens`` from the server's usage."""
    response = endpoint.create(messages=messages, **request_params(settings, settings.seed, thinking, max_think_tokens))
    choice = response.choices[0]
    think, content = _reasoning(choice.message), (choice.message.content or "").lstrip("\n")
    raw = content if think is None else THINK_OPEN + "\n" + think.strip("\n") + (
        f"\n{THINK_CLOSE}\n\n{content}" if content else "")
    think_text, answer, well_formed = split_think_answer(raw)
    finish = choice.finish_reason or "length"
    share = len(think_text) / max(1, len(think_text) + len(answer))
    think_n = answer_n = completion = 0
    if response.usage is not None:
        think_n, answer_n, completion = split_counts(response.usage, thinking, share, finish, THINK_CLOSE in raw)
    if THINK_CLOSE not in raw:  # as compare counts a local answer: no think block, all of the text is the answer
        think_n, answer_n = 0, max(0, completion - (finish == "stop"))
    return {"think": think_text, "answer": answer, "raw": raw, "well_formed": well_formed, "finish_reason": finish,
            "num_generated_tokens": completion, "think_tokens": think_n, "answer_tokens": answer_n}


def generate_answers(endpoint: Endpoint, conversations: Sequence[list[dict]], settings: Generation, *,
                     workers: int = 8, thinking: bool = True, progress: Callable[[int, int], None] | None = None,
                     max_think_tokens: int | None = None) -> list[dict]:
    """:func:`answer_one` for every conversation, ``workers`` requests at a time; the answers in the given order.
    Every request has the same seed (``settings.seed``)."""
    out: list = [None] * len(conversations)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="medsft-endpoint") as pool:
        futures = {pool.submit(answer_one, endpoint, m, settings, thinking, max_think_tokens): i
                   for i, m in enumerate(conversations)}
        for done, future in enumerate(as_completed(futures), 1):
            out[futures[future]] = future.result()
            if progress is not None:
                progress(done, len(conversations))
    return out
