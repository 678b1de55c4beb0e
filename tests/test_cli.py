"""The real ``medsft`` console script in subprocesses: fit → run folder → validate; errors; secrets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_rows, offline_env, write_jsonl

pytestmark = pytest.mark.e2e  # the real console script in subprocesses

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
FAKE_KEY = "sk-medsft-test-0123456789abcdef"
PLANTED = {"SWANLAB_API_KEY": FAKE_KEY, "HF_TOKEN": "hf_planted_0001", "MODELSCOPE_API_TOKEN": "ms-planted-0002",
           "OPENAI_API_KEY": "sk-planted-0004", "VLLM_API_KEY": "sk-vllm-planted-0005"}


def assert_no_secret(text: str | bytes, where: object) -> None:
    """None of the secrets planted in the environment appears in ``text``."""
    for name, secret in PLANTED.items():
        found = secret.encode() in text if isinstance(text, bytes) else secret in text
        assert not found, f"{name}'s value in {where}"


def medsft(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from medsft_lightning.cli import cli_main; cli_main()", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, cache_root):
    """One short demo-config fit on 24 rows, SwanLab offline, secrets planted in the environment (SwanLab's key,
    hub tokens, OpenAI/vLLM keys)."""
    work = tmp_path_factory.mktemp("cli")
    data = write_jsonl(work / "rows.jsonl", make_rows(24, answer_words=6))
    env = offline_env(cache_root, SWANLAB_MODE="offline", **PLANTED)
    proc = medsft(["fit", "--config", DEMO, "--data.dataset", str(data), "--trainer.max_epochs", "2",
                   "--data.max_length", "128"], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, env, proc


def test_fit_leaves_a_complete_run_folder(fitted):
    work, _, _ = fitted
    run = work / "runs" / "demo" / "version_0"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["model_name_or_path"] == "medsft:tiny-qwen3"
    assert cfg["data"]["max_length"] == 128
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    assert len(val) == 5  # the untrained baseline at step 0, then two validations per epoch
    assert val[0][0] == 0 and val[-1][1] < val[0][1]
    assert {"train_loss", "lr", "train_supervised_tokens_per_s", "val_ppl", "val_token_acc"} <= set(rows[0])
    assert any((run / "swanlog").iterdir())  # SwanLab's offline files live in the run folder


def test_validate_from_checkpoint_reproduces_the_best_val_loss(fitted):
    import re

    work, env, _ = fitted
    run = work / "runs" / "demo" / "version_0"
    data = work / "rows.jsonl"
    proc = medsft(["validate", "--config", DEMO, "--data.dataset", str(data), "--data.max_length", "128",
                   "--ckpt_path", str(run / "checkpoints" / "best.ckpt")], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.search(r"val_loss\W+([0-9.]+)", proc.stdout + proc.stderr)
    assert printed, (proc.stdout + proc.stderr)[-2000:]
    best = min(float(r["val_loss"]) for r in csv.DictReader((run / "metrics.csv").open()) if r["val_loss"])
    assert float(printed.group(1)) == pytest.approx(best, abs=1e-4)


def test_secrets_never_land_in_output_or_run_files(fitted):
    work, _, proc = fitted
    assert_no_secret(proc.stdout + proc.stderr, "fit's output")
    files = [p for p in (work / "runs").rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        assert_no_secret(path.read_bytes(), path)


def test_config_errors_are_listed_without_traceback(tmp_path, cache_root):
    proc = medsft(["fit", "--config", DEMO, "--data.max_length", "4", "--data.val_fraction", "2"],
                  cwd=tmp_path, env=offline_env(cache_root))
    assert proc.returncode != 0
    assert "--data.max_length=4" in proc.stderr and "--data.val_fraction=2" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--data.nope", "1"], "unrecognized arguments: --data.nope 1"),
    (["--data.batch_size", "abc"], 'Parser key "data.batch_size":\n  Expected a <class \'int\'>. Got value: abc'),
    (["--data.dataset", "/no/such.jsonl"], "data.dataset='/no/such.jsonl': no such file or folder"),
    (["--ckpt_path", "last"], "--ckpt_path='last': no last.ckpt under runs/demo/version_*/checkpoints"),
])
def test_bad_options_give_one_line_errors(tmp_path, cache_root, args, expected):
    proc = medsft(["fit", "--config", DEMO, *args], cwd=tmp_path, env=offline_env(cache_root))
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_named(tmp_path, cache_root):
    proc = medsft(["fit", "--config", str(tmp_path / "nope.yaml")], cwd=tmp_path, env=offline_env(cache_root))
    assert proc.returncode != 0 and f"File does not exist: '{tmp_path / 'nope.yaml'}'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_rows_name_file_line_and_field(tmp_path, cache_root):
    rows = make_rows(12)
    rows[4]["answer"] = 7
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    proc = medsft(["fit", "--config", DEMO, "--data.dataset", str(data)], cwd=tmp_path, env=offline_env(cache_root))
    assert proc.returncode != 0
    assert f"{data}:5: answer: expected a string, got int" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_parses(config, tmp_path, cache_root):
    proc = medsft(["fit", "--config", str(REPO / "configs" / config), "--print_config"], cwd=tmp_path,
                  env=offline_env(cache_root), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["model_name_or_path"]


def test_fit_exports_a_plain_transformers_model_and_samples(fitted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, _, proc = fitted
    run = work / "runs" / "demo" / "version_0"
    # medsft doctor's file checks ran on the export (the demo's head_dim 64 is one vLLM serves)
    assert "[doctor] runs/demo/version_0/hf_model: 8 of 8 checks passed" in proc.stderr
    rounds = {json.loads(line)["round"] for line in (run / "samples.jsonl").open(encoding="utf-8")}
    assert rounds == {0, 1, 2, 3, 4}  # baseline + 4 validations
    model = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    tok = AutoTokenizer.from_pretrained(run / "hf_model")
    assert model.generation_config.eos_token_id == [151645, 151643]
    ids = tok.apply_chat_template([{"role": "user", "content": "头痛怎么办？"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # The export holds the best checkpoint's weights.
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(best["model.model.norm.weight"], model.model.norm.weight)


def test_export_command(fitted, tmp_path):
    from transformers import AutoModelForCausalLM

    work, env, _ = fitted
    ckpt = work / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    proc = medsft(["export", str(ckpt), str(tmp_path / "out")], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "qwen3"


def test_predict_from_a_lightning_checkpoint(fitted, tmp_path):
    work, env, _ = fitted
    ckpt = work / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "发热怎么办？"}, {"id": "b", "question": "Cough?"}])
    out = tmp_path / "answers.jsonl"
    flags = ["--data.predict_dataset", str(questions), "--predict_writer.output_path", str(out),
             "--model.generation.max_new_tokens", "4", "--trainer.logger", "false"]
    proc = medsft(["predict", "--config", DEMO, "--ckpt_path", str(ckpt), *flags], cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a["id"] for a in answers] == [0, "b"]
    # The flag wins over the hyperparameters saved in the checkpoint (LightningCLI alone would apply those).
    assert all(a["num_generated_tokens"] <= 4 for a in answers), [a["num_generated_tokens"] for a in answers]
    assert "[ckpt] model.generation:" in proc.stdout + proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, "predict's output")
    for path in tmp_path.iterdir():
        assert_no_secret(path.read_bytes(), path)
    # Another checkpoint's answers do not go into the same file: one line, the file as it was.
    proc = medsft(["predict", "--config", DEMO, "--ckpt_path", str(ckpt.with_name("last.ckpt")), *flags], cwd=work,
                  env=env)
    assert proc.returncode == 1
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == answers
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medsft: error: {out} holds 2 answer(s) of another run") and "model.checkpoint" in last
    assert "Traceback" not in proc.stderr
