"""``medsft serve``: the vLLM command it builds, its refusals, and one real server (vLLM's CPU backend) for the
demo export, checked against medsft's own greedy decoding, thinking on/off, streaming and a SIGTERM stop.

The e2e test needs a Python with vLLM: ``$MEDSFT_VLLM_PYTHON``, else ``<repo>/.vllm-venv`` (built from scratch on
a clean clone by :func:`~medsft_lightning.tools.vllm_env.ensure_vllm_venv`, ~2.5 min, reused after).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medsft_lightning.data.encoding import build_prompts
from medsft_lightning.data.formatting import DEFAULT_SYSTEM_PROMPT, prompt_messages
from medsft_lightning.tools import serve, server_process
from medsft_lightning.tools.vllm_env import INSTALL_HINT, ensure_vllm_venv
from medsft_lightning.training.export import save_hf
from tests.conftest import offline_env

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["发烧了怎么办？", "What helps a mild headache?", "高血压患者日常饮食要注意什么？"]
MAX_TOKENS = 32
# What is compared: the server's greedy token ids (`return_token_ids`) for the 3 questions, position by position,
# with transformers' fp32 argmax on the same prefix (one forward pass of prompt + the server's tokens), and the
# decoded text and token count with medsft's generate_batch (the same prompts, one left-padded batch). A token may
# differ only where transformers' top-2 logit gap is below NEAR_TIE (it must then be the runner-up): the random
# tiny model's logits are nearly tied and vLLM's CPU kernels sum in another order. Measured: 3 of 3 identical,
# smallest gap 1.8e-3.
NEAR_TIE = 1e-3


@pytest.fixture(scope="session")
def demo_run(tiny_dir, tmp_path_factory) -> Path:
    """A run folder as ``medsft fit`` leaves it: ``runs/demo/version_0`` with config.yaml and the tiny model
    exported by :func:`save_hf` (fp32, ``dtype`` and ``torch_dtype`` named)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("serve") / "runs" / "demo" / "version_0"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    save_hf(model, AutoTokenizer.from_pretrained(tiny_dir), run / "hf_model")
    (run / "config.yaml").write_text("data:\n  max_length: 512\nsamples:\n  generation:\n    max_new_tokens: 320\n")
    return run


@pytest.fixture(scope="session")
def vllm_python() -> str:
    return os.environ.get("MEDSFT_VLLM_PYTHON") or ensure_vllm_venv(REPO / ".vllm-venv")


def args(*argv: str):
    return serve.build_parser().parse_args(["MODEL", *argv])


def test_vllm_argv_for_the_demo_export(demo_run):
    served = serve.resolve(demo_run)
    folder = str(demo_run / "hf_model")
    assert (served.folder, served.name, served.max_model_len) == (demo_run / "hf_model", "demo", 512 + 320)
    assert serve.vllm_argv(served, args(), "cpu", "/v/python") == [
        "/v/python", "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name", "demo",
        "--reasoning-parser", "qwen3", "--dtype", "float32", "--max-model-len", "832", "--host", "127.0.0.1",
        "--port", "8000", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
        "--gpu-memory-utilization", "0.15", "--enforce-eager"]
    gpu = serve.vllm_argv(served, args("--tensor_parallel_size", "4", "--pipeline_parallel_size", "2", "--host",
                                       "0.0.0.0", "--port", "9000", "--served_model_name", "medsft", "--max_model_len",
                                       "4096"), "cuda", "py", ["--api-key", "k", "--max-num-seqs", "8"])
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "4" and gpu[gpu.index("--pipeline-parallel-size") + 1] == "2"
    assert gpu[gpu.index("--host") + 1:gpu.index("--host") + 4] == ["0.0.0.0", "--port", "9000"]
    assert gpu[gpu.index("--served-model-name") + 1] == "medsft" and gpu[gpu.index("--max-model-len") + 1] == "4096"
    assert "--enforce-eager" not in gpu and "--gpu-memory-utilization" not in gpu  # vLLM's own GPU defaults
    assert gpu[-4:] == ["--api-key", "k", "--max-num-seqs", "8"]  # verbatim, last: they win
    explicit = serve.vllm_argv(served, args("--gpu_memory_utilization", "0.5", "--dtype", "bfloat16"), "cuda")
    assert explicit[explicit.index("--gpu-memory-utilization") + 1] == "0.5"
    assert explicit[explicit.index("--dtype") + 1] == "bfloat16"


def test_model_forms(demo_run, tiny_dir, tmp_path):
    assert serve.resolve(demo_run / "hf_model").name == "demo"  # the export inside a run: the run's name and length
    assert serve.resolve(demo_run / "hf_model").max_model_len == 832
    assert serve.resolve(demo_run.parent).folder == demo_run / "hf_model"  # runs/demo: its newest version
    bare = serve.resolve(tiny_dir)  # no run config: the model's positions, capped at 8192
    assert (bare.name, bare.max_model_len) == (tiny_dir.name, 4096)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  max_length: 64\n")
    with pytest.raises(serve.ServeError, match="a run folder without hf_model: serve a checkpoint"):
        serve.resolve(tmp_path / "run")
    with pytest.raises(serve.ServeError, match="no such file or folder"):
        serve.resolve(tmp_path / "absent")


def test_checkpoint_is_exported_beside_it(tiny_dir, tmp_path):
    from medsft_lightning.training.module import MedSFTModule

    module = MedSFTModule(str(tiny_dir))
    module.configure_model()
    ckpt = tmp_path / "runs" / "x" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"model_name_or_path": str(tiny_dir)}}, ckpt)
    (ckpt.parents[1] / "config.yaml").write_text("data:\n  max_length: 100\n")
    served = serve.resolve(ckpt)
    assert served.folder == ckpt.with_name("last.hf_model") and served.name == "x"
    assert served.max_model_len == 100 + serve.GENERATION_ROOM
    assert json.loads((served.folder / "config.json").read_text())["torch_dtype"] == "float32"
    serve.check_export(served.folder)  # passes doctor's file checks
    stamp = (served.folder / "model.safetensors").stat().st_mtime_ns
    assert serve.resolve(ckpt).folder == served.folder  # reused: newer than the checkpoint
    assert (served.folder / "model.safetensors").stat().st_mtime_ns == stamp


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        serve.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("medsft serve: error: ") and "\n" not in message
    return message


def test_clear_errors(demo_run, tmp_path, capsys):
    assert "no such file or folder" in fails([str(tmp_path / "absent")], capsys)
    missing = fails([str(demo_run), "--vllm_python", "/nonexistent/python"], capsys)
    assert "--vllm_python='/nonexistent/python' cannot import vllm" in missing and INSTALL_HINT in missing
    assert "pip install vllm" in missing and "--setup_vllm" in missing  # GPU and CPU
    broken = tmp_path / "broken"
    shutil.copytree(demo_run / "hf_model", broken)
    config = json.loads((broken / "config.json").read_text())
    config.pop("architectures")
    config["torch_dtype"] = "float16"
    (broken / "config.json").write_text(json.dumps(config))
    refused = fails([str(broken), "--vllm_python", "/nonexistent/python"], capsys)
    assert f"{broken} fails medsft doctor's checks: architectures, dtype (see `medsft doctor {broken}`)" in refused


def test_refuses_a_port_in_use(demo_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = fails([str(demo_run), "--port", str(port), "--vllm_python", "/nonexistent/python"], capsys)
    assert message == f"medsft serve: error: 127.0.0.1:{port} is already in use; pick another --port"
    assert "give MODEL" in fails([], capsys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_for(path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {path}:\n{path.read_text()[-3000:]}")


def reference(folder: Path):
    """medsft's greedy answers to QUESTIONS (one batch, as the generation callbacks decode), the prompts' ids,
    the tokenizer and the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft_lightning.generation.generate import Generation, generate_batch

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = build_prompts([{"question": q} for q in QUESTIONS], tokenizer, DEFAULT_SYSTEM_PROMPT)
    with torch.inference_mode():
        answers = generate_batch(model, tokenizer, prompts, Generation(max_new_tokens=MAX_TOKENS, do_sample=False))
    return answers, prompts, tokenizer, model


@pytest.mark.e2e
def test_serve_demo_export(demo_run, vllm_python, cache_root, tmp_path):
    from openai import OpenAI

    port, out, err = free_port(), tmp_path / "serve.out", tmp_path / "serve.err"
    from tests.test_serve_secrets import PLANTED

    key = "sk-vllm-planted-0005"  # given after --, as docs/serving.md shows; and secrets in the environment
    env = offline_env(cache_root, MEDSFT_VLLM_PYTHON=vllm_python, **PLANTED)
    start = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "medsft_lightning.cli", "serve", str(demo_run), "--port",
                                 str(port), "--", "--api-key", key], stdout=stdout, stderr=stderr, env=env,
                                cwd=tmp_path)
    vllm_pid = None
    try:
        answers, prompts, tokenizer, model = reference(demo_run / "hf_model")  # while vLLM starts
        vllm_pid = int(wait_for(err, r"\[serve\] vLLM pid (\d+)", 120).group(1))
        server_process.wait_ready(f"http://127.0.0.1:{port}/v1/models", 300, proc)
        ready = wait_for(out, r"ready after (\d+) s", 30)
        print(f"\n[serve] ready {time.monotonic() - start:.0f} s after `medsft serve` started "
              f"(vLLM: {ready.group(1)} s)")
        printed = out.read_text()
        command = printed.splitlines()[0]
        assert command.startswith(f"{vllm_python} -m vllm.entrypoints.openai.api_server --model {demo_run}/hf_model")
        for flag in ("--reasoning-parser qwen3", "--dtype float32", "--max-model-len 832", "--host 127.0.0.1",
                     "--served-model-name demo", "--gpu-memory-utilization 0.15", "--enforce-eager"):
            assert flag in command
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in printed
        assert 'extra_body={"chat_template_kwargs": {"enable_thinking": False}}' in printed

        assert command.endswith("--api-key ***")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=120)
        greedy = {"model": "demo", "max_tokens": MAX_TOKENS, "temperature": 0}
        identical = 0
        for question, prompt, answer in zip(QUESTIONS, prompts, answers):
            messages = prompt_messages({"question": question}, DEFAULT_SYSTEM_PROMPT)
            reply = client.chat.completions.create(messages=messages, **greedy, extra_body={"return_token_ids": True})
            choice = reply.choices[0]
            assert reply.prompt_token_ids == prompt  # the same chat template, the same prompt tokens
            ids = choice.token_ids
            with torch.inference_mode():  # transformers on the server's own prefix, position by position
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(ids)]
            values, top2 = logits.topk(2, dim=-1)
            gaps, top2 = (values[:, 0] - values[:, 1]).tolist(), top2.tolist()
            for i, token in enumerate(ids):
                assert token == top2[i][0] or (gaps[i] < NEAR_TIE and token == top2[i][1]), (
                    f"{question!r} position {i}: vLLM {token}, transformers' top 2 {top2[i]} "
                    f"(top-2 gap {gaps[i]:.2e})")
            same = tokenizer.decode(ids, skip_special_tokens=True) == answer["raw"] and \
                len(ids) == answer["num_generated_tokens"]
            identical += same
            assert same or min(gaps) < NEAR_TIE, (question, ids, answer)
            print(f"[serve] {question!r}: {len(ids)} tokens, {'identical' if same else 'differs'} "
                  f"(smallest top-2 gap {min(gaps):.1e})")
            # thinking on: the unclosed think block is the reasoning, no answer yet
            assert choice.message.reasoning == tokenizer.decode(ids, skip_special_tokens=True)
            assert choice.message.content is None
            assert getattr(choice.message, "reasoning_content", None) is None  # vLLM 0.32's field: reasoning
        print(f"[serve] {identical} of {len(QUESTIONS)} greedy answers identical to medsft's generate_batch")

        messages = prompt_messages({"question": QUESTIONS[0]}, DEFAULT_SYSTEM_PROMPT)
        off = {"chat_template_kwargs": {"enable_thinking": False}}
        plain = client.chat.completions.create(messages=messages, **greedy,
                                               extra_body={**off, "return_token_ids": True})
        closed = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False)
        assert plain.prompt_token_ids == tokenizer(closed, add_special_tokens=False)["input_ids"]
        assert plain.choices[0].message.content and plain.choices[0].message.reasoning is None

        thinking = client.chat.completions.create(messages=messages, **greedy)
        for request, reply, field in ((off, plain, "content"), ({}, thinking, "reasoning")):
            chunks = client.chat.completions.create(messages=messages, **greedy, stream=True, extra_body=request)
            streamed = "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks if c.choices)
            assert streamed == getattr(reply.choices[0].message, field)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # the port is closed
        assert live_members(vllm_pid) == []  # vLLM's API server, engine core and workers are gone
        assert "[serve] vLLM stopped (exit code 0)" in err.read_text()
        logged = out.read_text() + err.read_text()
        assert "non-default args" in logged  # vLLM logged its arguments, the key among them: masked
        for secret in [key, *PLANTED.values()]:
            assert secret not in logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        found = re.search(r"\[serve\] vLLM pid (\d+)", err.read_text(errors="replace"))
        vllm_pid = vllm_pid or (int(found.group(1)) if found else None)
        if vllm_pid is not None and live_members(vllm_pid):
            os.killpg(vllm_pid, signal.SIGKILL)
