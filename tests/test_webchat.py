"""``medsft webchat``: the streaming turn (no browser), the CLI's errors, and the real page in headless Chromium.

The browser test starts ``medsft webchat`` as a real subprocess whose every non-loopback connection or name
lookup is refused and logged (a ``sitecustomize`` put on its ``PYTHONPATH``), and records every request the
page makes, so both the server and the page are shown to stay on this machine.
``MEDSFT_WRITE_SCREENSHOTS=1`` also writes ``docs/webchat.png`` from a ``--compare`` run (two columns).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from medsft_lightning.generation.chat import ChatSession
from medsft_lightning.generation.generate import Generation
from medsft_lightning.tools import server_process, webchat
from tests.browser import browser
from tests.conftest import offline_env

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What helps a mild headache?"
NET_GUARD = '''
import os, socket
_log, _local = os.environ["MEDSFT_NET_LOG"], ("127.", "::1", "localhost", "0.0.0.0")
def _ok(host):
    host = host.decode() if isinstance(host, bytes) else host
    return not isinstance(host, str) or host == "" or host.startswith(_local) or "/" in host
def _refuse(what):
    with open(_log, "a", encoding="utf-8") as f:
        f.write(what + "\\n")
    raise OSError("refused by the test: " + what)
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
def connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    return _connect(self, address) if _ok(host) else _refuse(f"connect {address}")
def connect_ex(self, address):
    host = address[0] if isinstance(address, tuple) else address
    return _connect_ex(self, address) if _ok(host) else _refuse(f"connect_ex {address}")
def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo(host, *args, **kwargs) if host is None or _ok(host) else _refuse(f"getaddrinfo {host}")
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''
# Every distinct answer text the first column showed, recorded in the page as it changes.
WATCH_JS = """() => { window.seen = []; const chat = document.querySelector('#chat-0');
  new MutationObserver(() => { const bots = chat.querySelectorAll('[data-testid=bot] .message-content');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    if (window.seen[window.seen.length - 1] !== text) window.seen.push(text); })
  .observe(chat, {subtree: true, childList: true, characterData: true}); }"""


@pytest.fixture(scope="module")
def tiny_lm(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def session(tiny_lm, **kwargs) -> ChatSession:
    model, tokenizer = tiny_lm
    kwargs.setdefault("max_think_tokens", 6)
    return ChatSession(model, tokenizer, Generation(max_new_tokens=20), **kwargs)


def test_stream_turn_puts_think_and_answer_in_their_messages(tiny_lm):
    chat = session(tiny_lm)
    updates = list(webchat.stream_turn(chat, QUESTION, threading.Event()))
    reply = chat.replies[-1]
    assert reply.think and reply.answer and reply.forced_think_end
    assert len(updates) > 3, "the reply should stream in several updates"
    assert updates[0][0][1]["metadata"] == {"title": "Thinking", "status": "pending"}  # thinking, no answer yet
    streamed = [messages[-1]["content"] for messages, _ in updates[:-1] if "metadata" not in messages[-1]]
    assert streamed and all(a in b for a, b in zip(streamed, streamed[1:])), "the answer should only grow"
    messages, stats = updates[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant"]
    assert messages[0]["content"] == QUESTION
    assert messages[1] == {"role": "assistant", "content": reply.think,
                           "metadata": {"title": "Thinking", "status": "done"}}
    assert messages[2] == {"role": "assistant", "content": reply.answer}
    assert all(s == "generating…" for _, s in updates[:-1])
    assert stats == webchat.stats_line(reply) and "think 6 tokens" in stats and "finish_reason: length" in stats

    # a second turn keeps the first; a turn without thinking has no thinking message; a stopped one says so
    chat.enable_thinking = False
    messages, _ = list(webchat.stream_turn(chat, "And a fever?", threading.Event()))[-1]
    assert messages[:3] == updates[-1][0] and [m["role"] for m in messages[3:]] == ["user", "assistant"]
    assert "metadata" not in messages[4] and messages[4]["content"] == chat.replies[-1].answer
    stop = threading.Event()
    stop.set()
    messages, stats = list(webchat.stream_turn(chat, "Stop?", stop))[-1]
    assert messages[-1]["content"] == "_(stopped)_" and "finish_reason: interrupted" in stats


def test_apply_settings_reaches_every_session(tiny_lm):
    sessions = [session(tiny_lm), session(tiny_lm)]
    webchat.apply_settings(sessions, False, 0.0, 0.8, 5, 33)
    for s in sessions:
        assert not s.enable_thinking
        assert (s.settings.do_sample, s.settings.top_p, s.settings.top_k, s.settings.max_new_tokens) == (
            False, 0.8, 5, 33)


def test_missing_model_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # restored afterwards (main sets it)
    with pytest.raises(SystemExit) as err:
        webchat.main(["/no/such/dir", "--port", "0"])
    message = str(err.value.code)
    assert message.startswith("medsft webchat: error: MODEL='/no/such/dir'") and "\n" not in message


def test_without_gradio_says_what_to_install(monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ImportError
    with pytest.raises(SystemExit) as err:
        webchat.main(["whatever"])
    assert err.value.code == "medsft webchat needs gradio: pip install 'medsft[web]'"


def serve(cache_root: Path, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """Start ``medsft webchat ARGS`` (network refused and logged) and wait for its page: (process, url, net log)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "sitecustomize.py").write_text(NET_GUARD, encoding="utf-8")
    port, log, net = server_process.free_port("127.0.0.1"), tmp_path / "webchat.log", tmp_path / "net.log"
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = offline_env(cache_root, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=path, MEDSFT_NET_LOG=str(net))
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medsft_lightning.cli", "webchat", *args, "--port", str(port),
                                 "--max_new_tokens", "40", "--max_think_tokens", "8"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"medsft webchat exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return proc, url, net
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"medsft webchat did not answer on {url}:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ask(page, question: str, columns: int) -> None:
    """Type ``question``, send it, and wait for every column's stats line."""
    page.wait_for_selector("#question textarea")
    page.fill("#question textarea", question)
    page.click("#send")
    for i in range(columns):
        page.wait_for_function(f"document.querySelector('#stats-{i}').innerText.includes('finish_reason')",
                               timeout=90_000)


def write_docs_screenshot(cache_root: Path, tiny_dir: Path, tmp_path: Path, out: Path) -> None:
    """``docs/webchat.png``: a ``--compare`` run (base left, fine-tuned right), the right thinking opened."""
    model = Path("runs/demo/version_0/hf_model")  # under the name an exported run's has
    run = os.environ.get("MEDSFT_SCREENSHOT_RUN")  # a real demo run folder; else the tiny model itself
    (tmp_path / model.parent).mkdir(parents=True)
    (tmp_path / model).symlink_to(Path(run).resolve() / "hf_model" if run else tiny_dir, target_is_directory=True)
    proc, url, _ = serve(cache_root, tmp_path, str(model), "--compare", "medsft:tiny-qwen3")
    try:
        with browser(1400, 1000) as b:
            b.page.goto(url)
            ask(b.page, QUESTION, columns=2)
            b.page.locator("#chat-1 .thought-group .title").first.click()
            b.page.wait_for_selector("#chat-1 .thought-group .content")
            b.page.screenshot(path=str(out), full_page=True)
            assert b.outside_loopback() == []
    finally:
        stop_server(proc)


@pytest.mark.e2e
def test_webchat_page_streams_with_collapsible_thinking(cache_root, tiny_dir, tmp_path):
    proc, url, net = serve(cache_root, tmp_path, str(tiny_dir))
    try:
        with browser() as b:
            page = b.page
            page.goto(url)
            page.wait_for_selector("#chat-0")
            page.evaluate(WATCH_JS)
            ask(page, QUESTION, columns=1)
            stats = page.inner_text("#stats-0")
            assert "tokens/s" in stats and "think 8 tokens" in stats and "finish_reason: length" in stats

            answers = page.locator("#chat-0 [data-testid=bot] > .message-content")
            assert answers.count() == 1 and answers.first.inner_text().strip()
            assert len(page.evaluate("window.seen")) > 2, "the answer should arrive in several updates"
            thought = page.locator("#chat-0 .thought-group")
            assert thought.count() == 1 and thought.locator(".title").inner_text().strip() == "Thinking"
            content = thought.locator(".content")
            assert content.count() == 0, "a finished thinking block starts collapsed"
            thought.locator(".title").click()
            content.wait_for(state="visible")
            assert content.inner_text().strip() and content.inner_text() not in answers.first.inner_text()
            thought.locator(".title").click()
            content.wait_for(state="detached")
            page.screenshot(path=str(tmp_path / "webchat.png"), full_page=True)

            page.fill("#max_new_tokens input", "5000")  # a turn that only Stop ends soon
            page.press("#max_new_tokens input", "Tab")
            page.fill("#question textarea", "And a fever?")
            page.click("#send")
            page.wait_for_function("document.querySelector('#stats-0').innerText.includes('generating')")
            page.click("#stop")
            page.wait_for_function("document.querySelector('#stats-0').innerText.includes('finish_reason')",
                                   timeout=30_000)
            assert "finish_reason: interrupted" in page.inner_text("#stats-0")
            assert page.locator("#chat-0 [data-testid=user]").count() == 2
            page.click("#clear")
            page.wait_for_function("!document.querySelector('#chat-0 [data-testid=user]')")
            assert page.inner_text("#stats-0").strip() == ""
            assert b.outside_loopback() == []
    finally:
        stop_server(proc)
    assert not net.exists(), f"the server tried to reach the network: {net.read_text()}"
    if os.environ.get("MEDSFT_WRITE_SCREENSHOTS") == "1":
        write_docs_screenshot(cache_root, tiny_dir, tmp_path / "compare", ROOT / "docs" / "webchat.png")
