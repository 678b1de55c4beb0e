"""``medsft chat`` through a real pseudo-terminal (pexpect), and the chat engine's history and budget rules."""

from __future__ import annotations

import re
import sys
import time

import pexpect
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT, THINK_CLOSE
from medsft_lightning.generation.chat import ChatSession, read_transcript
from medsft_lightning.generation.generate import Generation
from tests.conftest import offline_env

STATS = r"\[[\d.]+ tokens/s · .*finish_reason (stop|length|interrupted)\]"


def spawn_chat(cache_root, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "medsft_lightning.cli", "chat", *args], env=offline_env(cache_root),
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact("you> ")
    return child


def read_until_stats(child: pexpect.spawn) -> list[tuple[float, str]]:
    """Every chunk the terminal shows until the stats line and the next ``you>`` prompt, with the time each
    arrived (both may come in one read, so the prompt is consumed here, not by a later expect)."""
    chunks, text = [], ""
    while not (found := re.search(STATS, text)) or "you> " not in text[found.end():]:
        chunk = child.read_nonblocking(size=4096, timeout=60)
        chunks.append((time.perf_counter(), chunk))
        text += chunk
    return chunks


def replied_after(chunks: list[tuple[float, str]], when: float) -> bool:
    """Whether a reply marker was shown at or before ``when`` (so the chunk then is reply text)."""
    return any("[think]" in c or "[answer]" in c for t, c in chunks if t <= when)


@pytest.mark.e2e
def test_chat_in_a_pty_streams_keeps_qwen3_history_and_saves(tmp_path, tiny_dir, tokenizer, cache_root):
    child = spawn_chat(cache_root, str(tiny_dir), "--max_new_tokens", "120", "--max_think_tokens", "5")
    child.sendline("What does a fever of 39 degrees mean?")
    chunks = read_until_stats(child)
    shown = "".join(c for _, c in chunks)
    assert "[think]" in shown and "[answer]" in shown and "budget reached: </think> forced" in shown
    # Streaming: the reply reached the terminal over many reads, its first tokens well before the stats line.
    replied = [(t, c) for t, c in chunks if "[think]" in c or "[answer]" in c or replied_after(chunks, t)]
    assert len(replied) >= 5, f"the reply arrived in {len(replied)} reads: not streamed"
    assert replied[-1][0] - replied[0][0] > 0.05

    child.sendline("/no_think")
    child.expect_exact("thinking off")
    child.sendline("And what should I do?")
    read_until_stats(child)
    child.sendline("/max_new_tokens")  # an unknown command: the help line, nothing asked
    child.expect_exact("/save FILE")
    child.expect_exact("you> ")
    transcript = tmp_path / "chat.jsonl"
    child.sendline(f"/save {transcript}")
    child.expect_exact("saved 2 turns")
    child.sendline("/exit")
    child.expect(pexpect.EOF)

    first, second = read_transcript(transcript)
    assert first["enable_thinking"] and not second["enable_thinking"]
    # --max_think_tokens 5: </think> comes within 5 think tokens (and was forced: the random model never closes it)
    assert first["forced_think_end"] and first["think_tokens"] == 5
    assert first["token_ids"].index(tokenizer.convert_tokens_to_ids(THINK_CLOSE)) <= 5
    # The second prompt is the chat template's rendering of the history: the first turn's thinking left out.
    history = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
               {"role": "user", "content": first["question"]},
               {"role": "assistant", "content": first["answer"], "reasoning_content": first["think"]},
               {"role": "user", "content": second["question"]}]
    rendered = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert second["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # the only think block left is /no_think's empty one: the first turn's (5 tokens) is not sent back
    assert first["think"] and rendered.count("<think>") == 1 and rendered.endswith("<think>\n\n</think>\n\n")


@pytest.mark.e2e  # a console-script subprocess
def test_chat_with_a_missing_model_is_one_clear_line(cache_root):
    child = pexpect.spawn(sys.executable, ["-m", "medsft_lightning.cli", "chat", "runs/nope/version_0/hf_model"],
                          env=offline_env(cache_root), encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before.strip()
    assert child.exitstatus == 1
    assert out.splitlines()[-1].startswith("medsft chat: error: MODEL='runs/nope/version_0/hf_model': no such file")
    assert "Traceback" not in out


@pytest.fixture(scope="module")
def tiny_chat(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def test_history_goes_through_the_template_and_drops_earlier_thinking(tiny_chat):
    model, tok = tiny_chat
    session = ChatSession(model, tok, Generation(max_new_tokens=12), max_think_tokens=3)
    first = session.ask("q one")
    assert first.think and first.forced_think_end and first.think_tokens == 3
    ids = session.prompt_ids("q two")
    expected = tok.apply_chat_template([{"role": "user", "content": "q one"},
                                        {"role": "assistant", "content": first.answer},
                                        {"role": "user", "content": "q two"}], tokenize=False,
                                       add_generation_prompt=True)
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert "<think>" not in tok.decode(ids)  # the first turn's think block is not sent back


def test_thinking_budget_forces_the_close_tag_and_streams_both_parts(tiny_chat):
    model, tok = tiny_chat
    close = tok.convert_tokens_to_ids(THINK_CLOSE)
    pieces: list[tuple[str, str]] = []
    reply = ChatSession(model, tok, Generation(max_new_tokens=20), max_think_tokens=4).ask(
        "q", on_delta=lambda kind, text: pieces.append((kind, text)))
    assert reply.token_ids[4] == close and reply.token_ids.count(close) == 1
    assert "".join(t for k, t in pieces if k == "think").strip() == reply.think
    assert "".join(t for k, t in pieces if k == "answer").strip() == reply.answer
    assert reply.answer_tokens == len(reply.token_ids) - 5 - (reply.finish_reason == "stop")
    # without a budget nothing is forced: the random model never writes </think> in 20 tokens
    free = ChatSession(model, tok, Generation(max_new_tokens=20)).ask("q")
    assert not free.forced_think_end and close not in free.token_ids


def test_same_seed_same_reply_and_no_think_uses_the_templates_empty_block(tiny_chat):
    model, tok = tiny_chat
    a = ChatSession(model, tok, Generation(max_new_tokens=10, seed=3)).ask("q")
    b = ChatSession(model, tok, Generation(max_new_tokens=10, seed=3)).ask("q")
    assert a.token_ids == b.token_ids
    plain = ChatSession(model, tok, Generation(max_new_tokens=10), enable_thinking=False)
    assert tok.decode(plain.prompt_ids("q")).endswith("<think>\n\n</think>\n\n")
    reply = plain.ask("q")
    assert reply.think == "" and reply.think_tokens == 0 and reply.answer_tokens > 0


@pytest.mark.e2e
def test_ctrl_c_stops_the_answer_not_the_chat(tiny_dir, cache_root):
    child = spawn_chat(cache_root, str(tiny_dir), "--max_new_tokens", "20000", "--no_think")
    child.sendline("Tell me everything about fevers.")
    child.expect_exact("[answer]")
    child.read_nonblocking(size=4096, timeout=30)  # tokens are arriving
    child.sendintr()
    child.expect(STATS)
    assert child.match.group(1) == "interrupted"
    child.expect_exact("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("style, shown", [
    ("full", "[think] \x1b[2mfirst line\nsecond line\x1b[0m\n[answer] Rest."),
    ("folded", "[think] first line …\n[answer] Rest."),
    ("hidden", "[think] \n[answer] Rest."),
])
def test_think_styles_show_the_think_block_apart(style, shown):
    import io

    from medsft_lightning.tools.chat import Printer

    out = io.StringIO()
    printer = Printer(out, style, color=True)
    for kind, text in [("think", "first "), ("think", "line\nsecond"), ("think", " line"), ("answer", "Rest.")]:
        printer(kind, text)
    assert out.getvalue() == shown


def test_the_stream_decodes_each_token_once_and_waits_for_whole_characters(tiny_chat):
    from medsft_lightning.generation.chat import ReplyStream

    _, tok = tiny_chat
    text = "<think>\n高烧39度𪚥 fever\n</think>\n\n多喝水，休息。"  # 𪚥: three byte-tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces: list[tuple[str, str]] = []
    decoded: list[int] = []

    class Counting:  # the tokenizer, counting the tokens each decode is handed
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, token_ids, **kwargs):
            decoded.append(len(token_ids))
            return tok.decode(token_ids, **kwargs)

    stream = ReplyStream(Counting(), thinking=True, on_delta=lambda kind, piece: pieces.append((kind, piece)))
    for i in ids + [tok.convert_tokens_to_ids("<|im_end|>")]:
        stream.add(i)
    assert sum(decoded) == len(ids) + 3  # each token once, 𪚥's first two again while it waited (not n²/2)
    assert stream.text == tok.decode(ids, skip_special_tokens=False)  # the pieces concatenate to the whole
    assert not any("\ufffd" in piece for _, piece in pieces)  # 𪚥 came whole, after its third token
    assert stream.parts() == ("高烧39度𪚥 fever", "多喝水，休息。", True)
    assert "".join(p for k, p in pieces if k == "answer") == "多喝水，休息。"
