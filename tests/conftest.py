"""Shared fixtures: an offline tiny Qwen3 on disk, offline environment, and a network guard."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "SWANLAB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)
# A stand-in vLLM package that tests put on a subprocess's PYTHONPATH (importing its server module starts it).
collect_ignore = ["fake_vllm"]


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="leave out the e2e tests (multi-process and console-script runs): the quick subset")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    kept = [item for item in items if "e2e" not in item.keywords]
    config.hook.pytest_deselected(items=[item for item in items if "e2e" in item.keywords])
    items[:] = kept


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a connection outside this machine."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in {"localhost", "::1"} or "/" in host):
            raise RuntimeError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """A MEDSFT_CACHE holding the tiny Qwen3 (built once per session, ~15 s)."""
    from medsft_lightning.hub.tiny import ensure_tiny_qwen3

    root = tmp_path_factory.mktemp("medsft-cache")
    ensure_tiny_qwen3(root)
    os.environ["MEDSFT_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_dir(cache_root) -> Path:
    return cache_root / "tiny-qwen3-v2"


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_rows(n: int, answer_words: int = 3) -> list[dict]:
    return [
        {
            "instruction": "",
            "question": f"Question {i}: what helps a mild headache?",
            "think": f"Case {i}. Consider tension headache, hydration and rest.",
            "answer": " ".join(["Rest"] * answer_words) + f" and drink water ({i}).",
            "metrics": {"quality_f1": 0.9},
        }
        for i in range(n)
    ]


def offline_env(cache_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(OFFLINE_ENV, MEDSFT_CACHE=str(cache_root), **extra)
    return env
