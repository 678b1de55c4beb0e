"""Secrets never reach what ``medsft serve`` prints: the API key given after ``--`` and every secret-looking
environment variable are masked in the vLLM command line and in vLLM's own log (a stand-in vLLM that logs its
arguments and environment, as vLLM logs its non-default args), and the ready banner's ``curl`` and ``openai``
examples work against a keyed server by reading ``$VLLM_API_KEY``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medsft_lightning.hub.secrets import argv_secrets, mask_argv, redact, secret_env_values
from tests.conftest import offline_env
from tests.test_serve import demo_run, free_port, wait_for  # noqa: F401  (demo_run: a fixture)

FAKE_VLLM = Path(__file__).parent / "fake_vllm"
REPO = Path(__file__).resolve().parents[1]
PLANTED = {"HF_TOKEN": "hf_planted_0001", "MODELSCOPE_API_TOKEN": "ms-planted-0002",
           "SWANLAB_API_KEY": "swan-planted-0003", "OPENAI_API_KEY": "sk-planted-0004"}


def test_masking_helpers():
    argv = ["--port", "8000", "--api-key", "k-one", "k-two", "--hf-token=hf_x1", "--max-model-len", "832"]
    assert mask_argv(argv) == ["--port", "8000", "--api-key", "***", "***", "--hf-token=***",
                               "--max-model-len", "832"]
    assert argv_secrets(argv) == ["k-one", "k-two", "hf_x1"]
    env = {**PLANTED, "MAX_NEW_TOKENS": "2048", "TOKENIZERS_PARALLELISM": "false", "PATH": "/bin"}
    assert sorted(secret_env_values(env)) == sorted(PLANTED.values())
    assert redact("key=sk-planted-0004, hf_planted_0001!", PLANTED.values()) == "key=***, ***!"


@pytest.mark.e2e
@pytest.mark.parametrize("key_from", ["argv", "env"])
def test_serve_prints_no_secret_and_its_examples_work_with_a_key(demo_run, cache_root, tmp_path,  # noqa: F811
                                                                   key_from):
    key = "sk-vllm-planted-0005"
    port, out, err = free_port(), tmp_path / "serve.out", tmp_path / "serve.err"
    env = offline_env(cache_root, PYTHONPATH=f"{FAKE_VLLM}:{REPO}", **PLANTED)
    env.pop("VLLM_API_KEY", None)
    extra = ["--", "--api-key", key] if key_from == "argv" else []
    if key_from == "env":
        env["VLLM_API_KEY"] = key
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "medsft_lightning.cli", "serve", str(demo_run),
                                 "--port", str(port), "--vllm_python", sys.executable, *extra],
                                stdout=stdout, stderr=stderr, env=env, cwd=tmp_path)
    try:
        wait_for(out, r"ready after \d+ s", 120)
        printed = out.read_text()
        curl = next(line.strip() for line in printed.splitlines() if line.strip().startswith("curl http"))
        assert '-H "Authorization: Bearer $VLLM_API_KEY"' in curl
        client_env = {"PATH": env["PATH"], "VLLM_API_KEY": key}
        reply = subprocess.run(["bash", "-c", curl], env=client_env, capture_output=True, text=True, timeout=60)
        assert json.loads(reply.stdout)["choices"][0]["message"]["content"] == "多喝水。", reply.stderr
        without = subprocess.run(["bash", "-c", curl], env={"PATH": env["PATH"], "VLLM_API_KEY": "wrong"},
                                 capture_output=True, text=True, timeout=60)
        assert "Unauthorized" in without.stdout  # the server does want the key: the example's header is needed
        python = printed[printed.index("  import os"):printed.index("  # thinking off")]
        snippet = subprocess.run([sys.executable, "-c", "\n".join(line[2:] for line in python.splitlines())],
                                 env={**client_env, "PYTHONPATH": env.get("PYTHONPATH", "")}, capture_output=True,
                                 text=True, timeout=60)
        assert snippet.stdout.splitlines() == ["用户发烧。", "多喝水。"], snippet.stderr[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    everything = out.read_text() + err.read_text()
    assert "non-default args:" in everything and "INFO environment:" in everything  # the stand-in did log them
    assert re.search(r"--api-key \*\*\*", everything) or key_from == "env"
    for secret in [key, *PLANTED.values()]:
        assert secret not in everything, secret
