"""``--endpoint URL``: chat, webchat and compare against a fake OpenAI-compatible server on 127.0.0.1.

The fake speaks what vLLM's OpenAI server with ``--reasoning-parser qwen3`` does: ``/v1/models``, and
``/v1/chat/completions`` streamed (SSE chunks: the think text as ``delta.reasoning``, then the answer as
``delta.content``, a ``finish_reason``, then ``usage``) or not; ``chat_template_kwargs.enable_thinking: false``
means no thinking. Every request is recorded (path, headers, JSON body).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pexpect
import pytest

from medsft_lightning.generation.chat import read_transcript
from medsft_lightning.generation.endpoint import EndpointSession, answer_one, connect
from medsft_lightning.generation.generate import Generation
from tests.conftest import OFFLINE_ENV, make_rows, write_jsonl

KEY = "sk-test-secret-1234"
THINK = ["\n", "A fever ", "of 39 ", "is high."]
ANSWER = ["\n\n", "Rest, ", "drink ", "fluids."]
STATS = r"\[[\d.]+ tokens/s · .*finish_reason (stop|length|interrupted)\]"


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.field, self.finish_reason, self.reasoning_tokens, self.delay = "reasoning", "stop", True, 0.0
        self.answer = ANSWER
        self.closed_early = threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def reply(self, body: dict) -> tuple[list[str], list[str], dict]:
        """The think and answer pieces for a request, and its usage (one token a piece, +2 tags, +1 stop)."""
        thinking = body.get("chat_template_kwargs", {}).get("enable_thinking", True)
        think = THINK if thinking else []
        completion = len(think) + len(self.answer) + (2 if thinking else 0) + (self.finish_reason == "stop")
        usage = {"prompt_tokens": 17, "completion_tokens": completion, "total_tokens": 17 + completion}
        if self.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": len(think)}
        return think, self.answer, usage


class Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args) -> None:
        pass

    def _json(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: dict | None) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append({"path": self.path, "headers": headers, "body": body})

    def do_GET(self) -> None:
        self._record(None)
        self._json({"object": "list", "data": [{"id": "fake-qwen3", "object": "model", "created": 0,
                                                "owned_by": "test"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._record(body)
        think, answer, usage = self.server.reply(body)
        field = self.server.field
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(answer), field: "".join(think) if think else None}
            return self._json({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "usage":
                               usage, "choices": [{"index": 0, "message": message,
                                                   "finish_reason": self.server.finish_reason}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        deltas = [{"role": "assistant", "content": ""}] + [{field: t} for t in think] + [{"content": a} for a in answer]
        chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": self.server.finish_reason}]})
        chunks.append({"choices": [], "usage": usage})
        try:
            for chunk in chunks:
                chunk.update(id="c", object="chat.completion.chunk", created=0, model=body["model"])
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(self.server.delay)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            self.server.closed_early.set()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_session_streams_think_then_answer_sends_history_without_thinking(fake, tmp_path):
    session = EndpointSession(connect(fake.url, KEY), Generation(max_new_tokens=64, seed=5),
                              system_prompt="You are a doctor.", max_think_tokens=32)
    assert session.endpoint.model == "fake-qwen3"  # the first of /v1/models
    pieces: list[tuple[str, str]] = []
    first = session.ask("What does a fever of 39 mean?", on_delta=lambda k, t: pieces.append((k, t)))
    kinds = [k for k, _ in pieces]
    assert kinds == ["think"] * 3 + ["answer"] * 3  # in order, leading newlines dropped
    assert first.think == "A fever of 39 is high." and first.answer == "Rest, drink fluids."
    # the server's counts: 4 think tokens (its reasoning_tokens), <think> and </think>, 4 answer tokens, <|im_end|>
    assert first.finish_reason == "stop" and first.think_tokens == 4 and first.answer_tokens == 4
    assert first.completion_tokens == 11 and first.prompt_tokens == 17 and first.tokens_per_s > 0
    body = fake.requests[-1]["body"]
    assert body["model"] == "fake-qwen3" and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["thinking_token_budget"] == 32
    assert body["seed"] == 5 and body["max_tokens"] == 64 and body["temperature"] == 0.6 and body["top_k"] == 20
    assert fake.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"

    session.enable_thinking = False  # /no_think
    second = session.ask("And what should I do?")
    body = fake.requests[-1]["body"]
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and "thinking_token_budget" not in body
    assert body["seed"] == 6  # turn k: seed + k
    assert body["messages"] == [{"role": "system", "content": "You are a doctor."},
                                {"role": "user", "content": "What does a fever of 39 mean?"},
                                {"role": "assistant", "content": "Rest, drink fluids."},
                                {"role": "user", "content": "And what should I do?"}]
    assert "fever of 39 is high" not in json.dumps(body)  # turn 1's thinking is not sent back
    assert second.think == "" and second.think_tokens == 0 and second.answer_tokens == 4

    saved = session.save(tmp_path / "chat.jsonl")
    assert KEY not in saved.read_text(encoding="utf-8")
    turns = read_transcript(saved)
    assert [t["enable_thinking"] for t in turns] == [True, False] and turns[0]["endpoint"] == fake.url


def test_counts_without_reasoning_tokens_length_and_greedy(fake):
    """An older server: ``reasoning_content`` and no ``reasoning_tokens``; the think share of the pieces splits
    ``completion_tokens``. ``finish_reason: length`` passes through; greedy is temperature 0."""
    fake.field, fake.reasoning_tokens, fake.finish_reason = "reasoning_content", False, "length"
    session = EndpointSession(connect(fake.url, served_model="fake-qwen3"), Generation(do_sample=False))
    reply = session.ask("q")
    assert reply.think == "A fever of 39 is high." and reply.finish_reason == "length"
    assert (reply.think_tokens, reply.answer_tokens, reply.completion_tokens) == (4, 4, 10)
    body = fake.requests[-1]["body"]
    assert body["temperature"] == 0.0 and "top_k" not in body and "top_p" not in body
    fake.answer = []  # cut off inside the think block: compare counts it all as the answer, as for a local model
    out = answer_one(session.endpoint, [{"role": "user", "content": "q"}], session.settings)
    assert out["raw"] == "<think>\nA fever of 39 is high." and not out["well_formed"] and out["think"] == ""
    assert (out["think_tokens"], out["answer_tokens"], out["num_generated_tokens"]) == (0, 6, 6)


def test_stop_event_closes_the_stream_as_interrupted(fake):
    fake.delay, fake.answer = 0.02, ["\n\n"] + ["word "] * 200
    stop = threading.Event()

    def on_delta(kind: str, text: str) -> None:
        if kind == "answer":
            stop.set()

    reply = EndpointSession(connect(fake.url), Generation()).ask("q", on_delta=on_delta, stop=stop)
    assert reply.finish_reason == "interrupted" and reply.answer.startswith("word") and len(reply.answer) < 100
    assert fake.closed_early.wait(10)  # the server saw the client go


def test_unknown_served_model_and_unreachable_endpoint_are_one_line(fake, capsys):
    from medsft_lightning.generation.endpoint import EndpointError
    from medsft_lightning.tools.chat import main

    with pytest.raises(EndpointError, match=r"--served_model='nope': .* serves fake-qwen3"):
        connect(fake.url, served_model="nope")
    url = closed_port_url()
    with pytest.raises(SystemExit) as caught:
        main(["--endpoint", url])
    message = str(caught.value.code)
    assert message.startswith(f"medsft chat: error: --endpoint={url}: cannot reach it") and "\n" not in message
    with pytest.raises(SystemExit) as caught:
        main(["some/model", "--endpoint", url])
    assert "not both" in str(caught.value.code)


def test_webchat_sessions_on_endpoints_stream_a_turn(fake):
    from medsft_lightning.tools import webchat

    args = webchat.build_parser().parse_args(["--endpoint", fake.url, "--compare_endpoint", fake.url, "--api_key",
                                              KEY, "--max_think_tokens", "8"])
    sessions, names = webchat.make_sessions(args)
    assert names == [f"fake-qwen3 @ {fake.url}"] * 2 and all(s.max_think_tokens == 8 for s in sessions)
    *_, (messages, stats) = list(webchat.stream_turn(sessions[1], "q", threading.Event()))
    assert [m.get("metadata", {}).get("title") for m in messages] == [None, "Thinking", None]
    assert messages[-1]["content"] == "Rest, drink fluids." and "finish_reason: stop" in stats


def test_compare_with_endpoints_writes_its_report(fake, tmp_path):
    from medsft_lightning.tools.compare import main

    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "a", "question": "What helps a fever?", "think": "Fluids.", "answer": "Rest, drink fluids."},
        {"id": "b", "question": "发烧怎么办？", "answer": "多喝水，休息。"},
        {"id": "c", "question": "Is ibuprofen safe with food?"},
    ])
    out = tmp_path / "out"
    main(["--base_endpoint", fake.url, "--endpoint", fake.url, "--questions", str(questions), "--out", str(out),
          "--api_key", KEY, "--max_new_tokens", "32", "--seed", "4", "--batch_size", "2"])
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [p["id"] for p in pairs] == ["a", "b", "c"]
    tuned = pairs[0]["tuned"]
    assert tuned["answer"] == "Rest, drink fluids." and tuned["think"] == "A fever of 39 is high."
    assert tuned["well_formed"] and tuned["finish_reason"] == "stop" and tuned["rougeL"] == 1.0
    assert (tuned["think_tokens"], tuned["answer_tokens"], tuned["num_generated_tokens"]) == (4, 4, 11)
    for side in ("base", "tuned"):
        entry = metrics["models"][side]
        assert entry["source"] == fake.url and entry["name"] == "fake-qwen3"
        assert entry["teacher_forced"]["val_loss"] is None and entry["generation"]["think_tokens"] == 4
    bodies = [r["body"] for r in fake.requests if r["body"]]
    assert len(bodies) == 6 and all(b["seed"] == 4 and not b.get("stream") for b in bodies)
    assert {b["messages"][-1]["content"] for b in bodies} == {"What helps a fever?", "发烧怎么办？",
                                                             "Is ibuprofen safe with food?"}
    md, page = (out / "report.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")
    assert "| val loss | n/a (served model) | n/a (served model) |" in md and "n/a (served model)" in page
    assert KEY not in md + page + json.dumps(metrics)


def test_compare_run_with_the_fine_tuned_model_served(fake, tmp_path, tiny_dir):
    """``--run RUN --endpoint URL``: the run needs no hf_model; its base is loaded and teacher-forced here, the
    served side's teacher-forced figures are n/a."""
    import yaml

    from medsft_lightning.tools.compare import main

    data = write_jsonl(tmp_path / "rows.jsonl", make_rows(8))
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"model_name_or_path": str(tiny_dir)},
              "data": {"dataset": str(data), "val_fraction": 0.25, "split_seed": 42, "max_length": 128}}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    main(["--run", str(run), "--endpoint", fake.url, "--limit", "2", "--max_new_tokens", "8"])
    metrics = json.loads((run / "compare" / "metrics.json").read_text(encoding="utf-8"))
    base, tuned = metrics["models"]["base"], metrics["models"]["tuned"]
    assert base["source"] == str(tiny_dir) and base["teacher_forced"]["rows"] == 2
    assert base["teacher_forced"]["val_loss"] > 0
    assert tuned["endpoint"] == fake.url and tuned["teacher_forced"]["val_loss"] is None
    assert metrics["questions"] == 2 and len([r for r in fake.requests if r["body"]]) == 2
    md = (run / "compare" / "report.md").read_text(encoding="utf-8")
    assert re.search(r"\| val loss \| [\d.]+ \| n/a \(served model\) \|", md) and "(2 rows," in (
        run / "compare" / "report.html").read_text(encoding="utf-8")


def test_compare_endpoint_conflicts_and_unreachable_are_one_line(tmp_path):
    from medsft_lightning.tools.compare import main

    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "ok?"}])
    url = closed_port_url()
    for argv, expected in (
        (["--base", "x", "--endpoint", url, "--model", "y"], "--endpoint replaces --model"),
        (["--base_endpoint", url, "--endpoint", url], f"--base_endpoint={url}: cannot reach it"),
    ):
        with pytest.raises(SystemExit) as caught:
            main([*argv, "--questions", str(questions), "--out", str(tmp_path / "o")])
        message = str(caught.value.code)
        assert message.startswith("medsft compare: error: ") and expected in message and "\n" not in message


@pytest.mark.e2e
def test_chat_command_in_a_pty_talks_to_the_endpoint(fake, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "OPENAI"))}
    child = pexpect.spawn(sys.executable, ["-m", "medsft_lightning.cli", "chat", "--endpoint", fake.url, "--api_key",
                                           KEY, "--no_color"], env={**env, **OFFLINE_ENV}, encoding="utf-8",
                          timeout=120, dimensions=(40, 200))
    child.expect_exact("you> ")
    banner = child.before
    assert f"fake-qwen3 @ {fake.url}" in banner and KEY not in banner
    child.sendline("What does a fever of 39 mean?")
    child.expect(STATS)
    shown = child.before + child.after
    assert child.match.group(1) == "stop"
    assert re.search(r"\[think\] A fever of 39 is high\.\s*\n\[answer\] Rest, drink fluids\.", shown), shown
    assert "think 4 tokens" in shown and "answer 4 tokens" in shown
    child.expect_exact("you> ")
    transcript = tmp_path / "chat.jsonl"
    child.sendline(f"/save {transcript}")
    child.expect_exact("saved 1 turns")
    child.expect_exact("you> ")
    fake.delay, fake.answer = 0.02, ["\n\n"] + ["word "] * 500
    child.sendline("Tell me everything.")  # Ctrl-C closes the stream: the turn ends as interrupted, the chat goes on
    child.expect_exact("[answer] word")
    child.sendintr()
    child.expect(STATS)
    assert child.match.group(1) == "interrupted" and fake.closed_early.wait(10)
    child.expect_exact("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert KEY not in child.before and KEY not in transcript.read_text(encoding="utf-8")
    assert fake.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"
    assert read_transcript(transcript)[0]["answer"] == "Rest, drink fluids."
