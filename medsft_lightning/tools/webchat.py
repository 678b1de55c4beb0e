"""``medsft webchat MODEL [--compare BASE]``: chat with a model (or a base and a fine-tuned one) in the browser.

A local Gradio page, bound to ``--host`` (127.0.0.1) and asking nothing of the internet: no share link, no
analytics, the theme's fonts the system's own. One chat column per model (with ``--compare``, the base on the
left and MODEL on the right); the answer streams in, its thinking in a collapsible "Thinking" block above it
(a message with Gradio's ``metadata={"title": ..., "status": ...}``), and a stats line follows each answer.
Both models answer every question with the same decoding settings and seed, one after the other::

    medsft webchat runs/demo/version_0/hf_model --compare medsft:tiny-qwen3 --max_think_tokens 256
    medsft webchat --endpoint http://127.0.0.1:8000/v1 --compare_endpoint http://127.0.0.1:8001/v1  # served ones

The conversation lives in the server (one :class:`~medsft_lightning.generation.chat.ChatSession` per model),
so it is one user's: a second tab sees and continues the same chat.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT
from medsft_lightning.generation.chat import ChatSession, Reply
from medsft_lightning.generation.generate import Generation
from medsft_lightning.tools.chat import add_endpoint_args, open_session
from medsft_lightning.tools.server_process import free_port

logger = logging.getLogger(__name__)

THINK_TITLE = "Thinking"
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO = ("ui-monospace", "Consolas", "monospace")
NO_GRADIO = "medsft webchat needs gradio: pip install 'medsft[web]'"


def turn_messages(question: str, think: str, answer: str, thinking: bool, done: bool,
                  finish_reason: str | None = None) -> list[dict]:
    """One turn as Gradio chat messages: the question, the thinking (a collapsible message titled
    :data:`THINK_TITLE`, ``pending`` until the answer starts) and the answer.

    Args:
        question: the user's message.
        think: the think block so far (without its tags).
        answer: the answer so far.
        thinking: whether the turn thinks (no thinking message otherwise).
        done: the turn has ended (``finish_reason`` set); an empty answer then says why.
        finish_reason: the reply's ``stop``, ``length`` or ``interrupted``.
    """
    out = [{"role": "user", "content": question}]
    if thinking and (think or not done):
        status = "done" if done or answer else "pending"
        out.append({"role": "assistant", "content": think or "…",
                    "metadata": {"title": THINK_TITLE, "status": status}})
    if answer:
        out.append({"role": "assistant", "content": answer})
    elif done:
        why = {"interrupted": "stopped", "length": "no answer within max_new_tokens"}.get(finish_reason, "no answer")
        out.append({"role": "assistant", "content": f"_({why})_"})
    elif not thinking:
        out.append({"role": "assistant", "content": "…"})
    return out


def history_messages(replies: Sequence[Reply]) -> list[dict]:
    """The finished turns of a session as Gradio chat messages."""
    out: list[dict] = []
    for r in replies:
        out += turn_messages(r.question, r.think, r.answer, r.enable_thinking, True, r.finish_reason)
    return out


def stats_line(reply: Reply | None) -> str:
    """The stats under a column after an answer, e.g. ``31.2 tokens/s · think 8 tokens · answer 31 tokens ·
    finish_reason: length``; ``""`` before the first answer."""
    if reply is None:
        return ""
    forced = " (thinking budget reached)" if reply.forced_think_end else ""
    return (f"{reply.tokens_per_s:.1f} tokens/s · think {reply.think_tokens} tokens{forced} · answer "
            f"{reply.answer_tokens} tokens · finish_reason: {reply.finish_reason}")


def stream_turn(session: ChatSession, question: str, stop: threading.Event) -> Iterator[tuple[list[dict], str]]:
    """Ask ``session`` ``question`` in a worker thread and yield ``(messages, stats)`` as the reply grows.

    ``messages``: the whole chat (earlier turns, then this one so far); ``stats``: ``"generating…"`` until the
    last yield, which shows the finished reply (as :func:`history_messages` renders it) with its
    :func:`stats_line`. Closing the generator early (the page went away) sets ``stop`` and waits for the worker,
    so the session is never left half-written.
    """
    history = history_messages(session.replies)
    pieces: queue.Queue = queue.Queue()
    result: dict = {}

    def work() -> None:
        try:
            result["reply"] = session.ask(question, on_delta=lambda kind, text: pieces.put((kind, text)), stop=stop)
        except Exception as err:  # re-raised in the caller's thread
            result["error"] = err
        finally:
            pieces.put(None)

    worker = threading.Thread(target=work, name="medsft-webchat-turn", daemon=True)
    parts, thinking, finished = {"think": "", "answer": ""}, session.enable_thinking, False
    worker.start()
    try:
        yield history + turn_messages(question, "", "", thinking, False), "generating…"
        while not finished:
            items = [pieces.get()]
            while not pieces.empty():  # everything already decoded goes out in one update
                items.append(pieces.get())
            for item in items:
                if item is None:
                    finished = True
                else:
                    parts[item[0]] += item[1]
            if not finished:
                yield history + turn_messages(question, parts["think"], parts["answer"], thinking, False), "generating…"
    finally:
        if worker.is_alive():
            stop.set()
            worker.join()
    if "error" in result:
        raise result["error"]
    yield history_messages(session.replies), stats_line(result["reply"])


def apply_settings(sessions: Sequence[ChatSession], thinking: bool, temperature: float, top_p: float, top_k: float,
                   max_new_tokens: float) -> None:
    """The page's controls into every session (so both models of a comparison decode alike); temperature 0:
    greedy."""
    for s in sessions:
        s.enable_thinking = bool(thinking)
        s.settings = replace(s.settings, do_sample=temperature > 0, temperature=float(temperature), top_p=float(top_p),
                             top_k=int(top_k), max_new_tokens=int(max_new_tokens))


def local_theme():
    """Gradio's default theme with the system's fonts only, so the page loads no web fonts."""
    import gradio as gr

    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO))


def _columns(names: Sequence[str]) -> tuple[list, list]:
    """One column per model, each titled (with two: ``Base``, then ``Fine-tuned``): ``(chatbots, stats lines)``."""
    import gradio as gr

    chats, stats = [], []
    kinds = ["Base", "Fine-tuned"] if len(names) == 2 else [None] * len(names)
    with gr.Row():
        for i, (name, kind) in enumerate(zip(names, kinds)):
            with gr.Column():
                gr.Markdown(f"### {kind}: `{name}`" if kind else f"### `{name}`", elem_id=f"title-{i}")
                chats.append(gr.Chatbot(label=name, show_label=False, height=480, elem_id=f"chat-{i}",
                                        feedback_options=None, buttons=["copy", "copy_all"]))  # no "share"
                stats.append(gr.Markdown("", elem_id=f"stats-{i}"))
    return chats, stats


def _controls(session: ChatSession) -> dict:
    """The question box, the Send/Stop/Clear buttons and the decoding controls (starting from ``session``'s)."""
    import gradio as gr

    first, out = session.settings, {}
    with gr.Row():
        out["box"] = gr.Textbox(placeholder="Ask a medical question…", show_label=False, scale=6, elem_id="question")
        out["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        out["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        out["clear"] = gr.Button("Clear", scale=1, elem_id="clear")
    with gr.Accordion("Decoding", open=True), gr.Row():
        out["settings"] = [
            gr.Checkbox(value=session.enable_thinking, label="Thinking", elem_id="thinking"),
            gr.Slider(0, 2, value=first.temperature, step=0.05, label="temperature (0: greedy)"),
            gr.Slider(0.05, 1, value=first.top_p, step=0.01, label="top_p"),
            gr.Slider(0, 200, value=first.top_k, step=1, label="top_k (0: off)"),
            gr.Number(value=first.max_new_tokens, minimum=1, precision=0, label="max_new_tokens",
                      elem_id="max_new_tokens"),
        ]
    return out


def build_app(sessions: Sequence[ChatSession], names: Sequence[str], title: str = "medsft webchat"):
    """The Gradio page: one chat column per session (titled by ``names``), the shared controls below.

    Args:
        sessions: one or two chat sessions (with ``--compare``: the base first, shown on the left).
        names: each session's model, as the user gave it.
        title: the page's title.

    Returns:
        a ``gr.Blocks`` to ``launch`` (with :func:`local_theme`, as :func:`main` does).
    """
    import gradio as gr

    stop = threading.Event()

    def show() -> list:
        return [x for s in sessions for x in (history_messages(s.replies),
                                              stats_line(s.replies[-1] if s.replies else None))]

    def respond(question: str, *settings) -> Iterator[list]:
        if not question.strip():
            yield show()
            return
        apply_settings(sessions, *settings)
        stop.clear()
        shown = [[history_messages(s.replies) + [{"role": "user", "content": question}], "waiting…"]
                 for s in sessions]
        for i, session in enumerate(sessions):  # one after the other, each streaming into its column
            for shown[i] in stream_turn(session, question, stop):
                yield [x for pair in shown for x in pair]

    def reset() -> list:
        for s in sessions:
            s.reset()
        return show()

    with gr.Blocks(analytics_enabled=False, title=title) as app:
        chats, stats = _columns(names)
        ui, asked = _controls(sessions[0]), gr.State("")
        outputs = [x for pair in zip(chats, stats) for x in pair]
        for trigger in (ui["send"].click, ui["box"].submit):  # the box empties at once, the question goes on
            trigger(lambda q: ("", q), ui["box"], [ui["box"], asked], queue=False).then(
                respond, [asked, *ui["settings"]], outputs, concurrency_id="chat", concurrency_limit=1,
                show_progress="hidden")
        ui["stop"].click(stop.set, queue=False)
        for trigger in (ui["clear"].click, *(chat.clear for chat in chats)):  # a chatbot's trash icon clears all
            trigger(stop.set, queue=False).then(reset, None, outputs, concurrency_id="chat", concurrency_limit=1)
        app.load(show, None, outputs, queue=False)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsft webchat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", metavar="MODEL", nargs="?", help="an exported hf_model folder, a .ckpt, or a hub id "
                        "(leave it out with --endpoint)")
    parser.add_argument("--compare", metavar="BASE", help="a second model (the base) answering beside MODEL")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (0: any free one)")
    parser.add_argument("--max_new_tokens", type=int, default=2048, help="most tokens per answer, thinking included")
    parser.add_argument("--temperature", type=float, help="default: the model's generation_config, else 0.6")
    parser.add_argument("--top_p", type=float, help="default: the model's generation_config, else 0.95")
    parser.add_argument("--top_k", type=int, help="default: the model's generation_config, else 20")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (turn k samples from seed + k)")
    parser.add_argument("--max_think_tokens", type=int, help="thinking budget: </think> is forced after it")
    parser.add_argument("--no_think", action="store_true", help="start with thinking off")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    add_endpoint_args(parser, compare=True)
    return parser


def make_sessions(args: argparse.Namespace) -> tuple[list, list[str]]:
    """MODEL's (and BASE's) sessions, loaded here or on a running server: ``(sessions, names)``, the base first."""
    from medsft_lightning.generation.endpoint import EndpointError
    from medsft_lightning.tools.models import ModelError

    settings = Generation(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
    options = dict(system_prompt=args.system_prompt or None, enable_thinking=not args.no_think,
                   max_think_tokens=args.max_think_tokens)
    sides = [dict(model=args.model, endpoint=args.endpoint, served_model=args.served_model)]
    if args.compare or args.compare_endpoint:
        sides.insert(0, dict(model=args.compare, flag="--compare", endpoint=args.compare_endpoint,
                             endpoint_flag="--compare_endpoint", served_model=args.compare_served_model,
                             served_flag="--compare_served_model"))
    try:
        opened = [open_session(settings, options, api_key=args.api_key, device=args.device, **side) for side in sides]
    except (ModelError, EndpointError) as err:
        sys.exit(f"medsft webchat: error: {err}")
    logger.info("[webchat] %s", opened[0][0].settings.describe())
    return [session for session, _, _ in opened], [name for _, name, _ in opened]


def main(argv: list[str] | None = None) -> None:
    """``medsft webchat MODEL [--compare BASE]``: serve the chat page until Ctrl-C."""
    args = build_parser().parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no telemetry
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit(NO_GRADIO)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sessions, names = make_sessions(args)
    app = build_app(sessions, names)
    port = args.port or free_port(args.host)
    try:
        app.launch(server_name=args.host, server_port=port, share=False, inbrowser=False, show_error=True,
                   ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, theme=local_theme())
    except OSError as err:  # the port is taken, the host is not this machine's
        sys.exit(f"medsft webchat: error: cannot listen on {args.host}:{port} ({err})")
