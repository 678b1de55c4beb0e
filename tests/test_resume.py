"""Exact resume of ``medsft fit`` after SIGKILL (real subprocesses): mid-epoch, and during a checkpoint write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_rows, offline_env, write_jsonl
from tests.test_cli import DEMO, medsft

pytestmark = pytest.mark.e2e  # real medsft fit subprocesses killed with SIGKILL

REPO = Path(__file__).resolve().parents[1]


def write_config(work: Path, data: Path, probe: dict) -> Path:
    """The demo config on 25 short rows (22 train), 2 epochs of 6 steps, last.ckpt every 2 steps, plus the probe."""
    cfg = yaml.safe_load(Path(DEMO).read_text())
    callbacks = cfg["trainer"]["callbacks"]
    periodic = next(c for c in callbacks if c["init_args"].get("every_n_train_steps"))
    periodic["init_args"]["every_n_train_steps"] = 2
    callbacks.append({"class_path": "tests.resume_probe.Probe", "init_args": probe})
    cfg["trainer"].update(max_epochs=2, logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                 "init_args": {"save_dir": "runs", "name": "r"}}])
    cfg["data"].update(dataset=str(data), max_length=128)
    cfg["samples"] = {"num_samples": 1, "generation": {"max_new_tokens": 4}}
    cfg["gen_metrics"] = {"num_rows": 0}
    cfg.update(export=False, baseline_validation=False)
    path = work / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def fit(work: Path, env: dict, probe: dict, *extra: str):
    work.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(work / "rows.jsonl", make_rows(25, answer_words=6))  # 22 train rows (int(25 * 0.9))
    config = write_config(work, data, probe)
    return medsft(["fit", "--config", str(config), *extra], cwd=work, env=env)


def last_val_loss(run: Path) -> float:
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val_loss")]
    return float(rows[-1]["val_loss"])


def batches_by_step(log: Path) -> dict[int, list[int]]:
    """Global step → rows trained on; a step replayed after a resume overwrites the lost attempt."""
    return {e["step"]: e["rows"] for e in map(json.loads, log.read_text().splitlines())}


@pytest.fixture(scope="module")
def env(cache_root):
    return {**offline_env(cache_root), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    work = tmp_path_factory.mktemp("whole")
    proc = fit(work, env, {"log": str(work / "batches.jsonl")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_val_loss(work / "runs/r/version_0"), batches_by_step(work / "batches.jsonl")


@pytest.mark.parametrize("kill", ["kill_at_step", "kill_in_save_at_step"])
def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path, env, uninterrupted, kill):
    whole_loss, whole_batches = uninterrupted
    log = tmp_path / "batches.jsonl"
    # kill_at_step 5: killed after step 5, before its checkpoint; the last one is from step 4 (mid-epoch 0).
    # kill_in_save_at_step 5: killed halfway through writing the step-6 checkpoint over last.ckpt.
    killed = fit(tmp_path, env, {"log": str(log), kill: 5})
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = tmp_path / "runs/r/version_0/checkpoints"
    if kill == "kill_in_save_at_step":
        assert list(ckpts.glob("*.tmp-*")), "the torn write should have been left in a temporary file"
    resumed = fit(tmp_path, env, {"log": str(log)}, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming epoch 0 after its first 4 micro-batches" in resumed.stderr + resumed.stdout
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    first_resumed = entries[6 if kill == "kill_in_save_at_step" else 5]  # steps 0-5 or 0-4 ran before the kill
    assert (first_resumed["step"], first_resumed["batch_idx"]) == (4, 4)  # no restart from the epoch's beginning
    assert batches_by_step(log) == whole_batches  # every step trained on the same rows
    assert sorted(whole_batches) == list(range(12))
    assert last_val_loss(tmp_path / "runs/r/version_1") == pytest.approx(whole_loss, abs=1e-4)


def test_resume_with_the_optimizer_stepped_in_backward(tmp_path, env):
    """model.optimizer_in_backward keeps one optimizer per parameter: its checkpoint resumes exactly too."""
    extra = ("--model.optimizer_in_backward", "true", "--trainer.gradient_clip_val", "null")
    whole = tmp_path / "whole"
    proc = fit(whole, env, {"log": str(whole / "batches.jsonl")}, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stepped per parameter inside backward" in proc.stderr + proc.stdout
    work, log = tmp_path / "killed", tmp_path / "killed" / "batches.jsonl"
    killed = fit(work, env, {"log": str(log), "kill_at_step": 5}, *extra)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(work, env, {"log": str(log)}, *extra, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert batches_by_step(log) == batches_by_step(whole / "batches.jsonl")
    whole_loss = last_val_loss(whole / "runs/r/version_0")
    assert last_val_loss(work / "runs/r/version_1") == pytest.approx(whole_loss, abs=1e-4)
