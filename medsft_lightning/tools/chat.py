"""``medsft chat MODEL`` (or ``--endpoint URL``): talk to a model in the terminal, tokens streaming as they come.

The think block shows apart from the answer (``--think full``: dim; ``folded``: its first line, then its
token count; ``hidden``: only the count). Commands between turns: ``/think`` and ``/no_think`` (the chat
template's ``enable_thinking``), ``/reset``, ``/save FILE`` (the transcript as JSONL), ``/help``, ``/exit``.
Ctrl-C stops the current answer (``finish_reason: interrupted``), not the program; Ctrl-D or ``/exit`` ends
it. The conversation itself (history through the chat template, thinking budget, decoding) is
:class:`~medsft_lightning.generation.chat.ChatSession`. With ``--endpoint URL`` (and no MODEL) a running
OpenAI-compatible server answers instead (``medsft serve``, vLLM: the model stays there; ``--served_model`` picks
one of its ``/v1/models``): :class:`~medsft_lightning.generation.endpoint.EndpointSession`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TextIO

from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT
from medsft_lightning.generation.chat import ChatSession, Reply
from medsft_lightning.generation.endpoint import EndpointError, EndpointSession, connect
from medsft_lightning.generation.generate import Generation

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "/think · /no_think · /reset · /save FILE · /help · /exit   (Ctrl-C stops an answer, Ctrl-D quits)"


class Printer:
    """Writes a reply's think/answer deltas to ``out`` in the chosen ``think`` style."""

    def __init__(self, out: TextIO, think: str, color: bool) -> None:
        self.out, self.think, self.color = out, think, color
        self.kind: str | None = None
        self.folded_done = False

    def __call__(self, kind: str, text: str) -> None:
        if kind != self.kind:
            self._switch(kind)
        if kind == "think":
            text = self._fold(text)
        self.out.write(text)
        self.out.flush()

    def _switch(self, kind: str) -> None:
        if self.kind == "think" and self.color and self.think == "full":
            self.out.write(RESET)
        if kind == "think":
            self.out.write("[think] " + (DIM if self.color and self.think == "full" else ""))
        else:
            self.out.write("\n[answer] " if self.kind == "think" else "[answer] ")
        self.kind = kind

    def _fold(self, text: str) -> str:
        if self.think == "full":
            return text
        if self.think == "hidden" or self.folded_done:
            return ""
        head, newline, _ = text.partition("\n")
        if newline:
            self.folded_done = True
            return head + " …"
        return head

    def finish(self, reply: Reply) -> None:
        if self.kind == "think" and self.color and self.think == "full":
            self.out.write(RESET)
        forced = ", budget reached: </think> forced" if reply.forced_think_end else ""
        thinking = f"think {reply.think_tokens} tokens{forced} · " if reply.enable_thinking else "no thinking · "
        self.out.write(f"\n[{reply.tokens_per_s:.1f} tokens/s · {thinking}answer {reply.answer_tokens} tokens · "
                       f"finish_reason {reply.finish_reason}]\n")
        self.out.flush()


def command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run one ``/command``; ``False`` when the chat should end."""
    name, _, arg = line.strip().partition(" ")
    if name in {"/exit", "/quit"}:
        return False
    if name in {"/think", "/no_think"}:
        session.enable_thinking = name == "/think"
        out.write(f"thinking {'on' if session.enable_thinking else 'off'}\n")
    elif name == "/reset":
        session.reset()
        out.write("history cleared\n")
    elif name == "/save":
        if not arg.strip():
            out.write("usage: /save FILE\n")
        else:
            out.write(f"saved {len(session.replies)} turns to {session.save(arg.strip())}\n")
    else:
        out.write(HELP + "\n")
    return True


def repl(session: ChatSession, think: str, color: bool, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> None:
    """Read questions and commands with ``read(prompt)`` until ``/exit`` or end of input (``EOFError``)."""
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except KeyboardInterrupt:
            out.write("\n(/exit or Ctrl-D to quit)\n")
            continue
        except EOFError:
            out.write("\n")
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not command(session, line, out):
                return
            continue
        printer = Printer(out, think, color)
        try:
            reply = session.ask(line.strip(), on_delta=printer)
        except KeyboardInterrupt:  # outside the decoding loop (which turns it into finish_reason interrupted)
            out.write("\n(stopped)\n")
            continue
        except EndpointError as err:  # the server went away or refused this request: the chat goes on
            out.write(f"\n(error: {err})\n")
            continue
        printer.finish(reply)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsft chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="MODEL", nargs="?", help="an exported folder (runs/…/hf_model), a .ckpt, a "
                        "local model folder, medsft:tiny-qwen3, a ModelScope id (Qwen/Qwen3-1.7B) or hf://owner/name; "
                        "leave it out with --endpoint")
    add_endpoint_args(parser)
    parser.add_argument("--think", choices=["full", "folded", "hidden"], default="full",
                        help="how the think block shows: full (dim), folded (first line + token count), hidden")
    parser.add_argument("--no_think", action="store_true", help="start with thinking off (/think turns it on)")
    parser.add_argument("--max_think_tokens", type=int, default=None,
                        help="thinking budget: after N think tokens </think> is forced and the answer follows")
    parser.add_argument("--max_new_tokens", type=int, default=2048, help="most tokens per reply (think included)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model's generation config, "
                        "else Qwen3's 0.6")
    parser.add_argument("--top_p", type=float, default=None, help="default: generation config, else 0.95")
    parser.add_argument("--top_k", type=int, default=None, help="default: generation config, else 20")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (Qwen3's card warns it repeats)")
    parser.add_argument("--seed", type=int, default=0, help="turn k samples from seed + k")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT, help="'' for none")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    parser.add_argument("--no_color", action="store_true", help="no ANSI dimming of the think block")
    return parser


def add_endpoint_args(parser: argparse.ArgumentParser, compare: bool = False) -> None:
    """``--endpoint``, ``--served_model``, ``--api_key`` (chat, webchat); ``compare``: ``--compare_endpoint`` and
    ``--compare_served_model`` too (webchat)."""
    add = parser.add_argument
    add("--endpoint", metavar="URL", help="talk to a running OpenAI-compatible server instead of loading MODEL (medsft "
        "serve, vLLM), e.g. http://127.0.0.1:8000/v1; unset decoding settings: Qwen3's")
    add("--served_model", metavar="NAME", help="with --endpoint: the model to ask (default: the first of /v1/models)")
    if compare:
        add("--compare_endpoint", metavar="URL", help="the base served by a running server, instead of --compare BASE")
        add("--compare_served_model", metavar="NAME", help="with --compare_endpoint: the model to ask (default: the "
            "first of /v1/models)")
    add("--api_key", help="for the endpoints: the API key (default: $OPENAI_API_KEY, else EMPTY); never shown or saved")


def open_session(settings: Generation, options: dict, *, model: str | None, endpoint: str | None, flag: str = "MODEL",
                 endpoint_flag: str = "--endpoint", served_model: str | None = None,
                 served_flag: str = "--served_model", api_key: str | None = None, device: str = "cpu"):
    """``(session, name, source)``: a session on a running server (``endpoint``) or on ``model``, loaded here.

    Raises:
        EndpointError: both or neither given; the server cannot be used.
        ModelError: ``model`` does not load.
    """
    from medsft_lightning.tools.models import load_model

    if (model is None) == (endpoint is None):
        raise EndpointError(f"give {flag} (a model to load) or {endpoint_flag} URL (a running server)"
                            + (", not both" if model else ""))
    if endpoint:
        where = connect(endpoint, api_key, served_model, flag=endpoint_flag, model_flag=served_flag)
        session = EndpointSession(where, settings, **options)
        return session, session.label, session.label
    loaded = load_model(model, flag=flag, device=device)
    return ChatSession(loaded.model, loaded.tokenizer, settings, **options), loaded.name, loaded.source


def main(argv: list[str] | None = None) -> None:
    """``medsft chat MODEL`` or ``medsft chat --endpoint URL``: see the module docstring."""
    from medsft_lightning.tools.models import ModelError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.max_think_tokens is not None and args.max_think_tokens < 0:
        sys.exit(f"medsft chat: error: --max_think_tokens={args.max_think_tokens}: use 0 or more")
    settings = Generation(max_new_tokens=args.max_new_tokens, do_sample=False if args.greedy else None,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    options = dict(system_prompt=args.system_prompt or None, enable_thinking=not args.no_think,
                   max_think_tokens=args.max_think_tokens)
    try:
        session, _, source = open_session(settings, options, model=args.model, endpoint=args.endpoint,
                                          served_model=args.served_model, api_key=args.api_key, device=args.device)
    except (ModelError, EndpointError) as err:
        sys.exit(f"medsft chat: error: {err}")
    sys.stdout.write(f"medsft chat: {source} · {session.settings.describe()} · thinking "
                     f"{'on' if session.enable_thinking else 'off'}\n")
    repl(session, args.think, color=not args.no_color and sys.stdout.isatty())
