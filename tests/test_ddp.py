"""Data parallel on CPU: 2 DDP processes (gloo) train exactly like 1 process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import make_rows, offline_env, write_jsonl
from tests.test_resume import REPO, last_val_loss, write_config

pytestmark = pytest.mark.e2e  # 2 DDP processes

MEDSFT = str(Path(sys.executable).parent / "medsft")  # the console script: DDP re-launches it per rank


def fit(work: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(work / "rows.jsonl", make_rows(25, answer_words=6))  # 22 train rows (int(25 * 0.9))
    config = write_config(work, data, {"log": str(work / "batches.jsonl")})
    return subprocess.run([MEDSFT, "fit", "--config", str(config), *extra], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not Path(MEDSFT).exists(), reason="needs the installed medsft console script")
def test_two_ddp_processes_match_one_process(tmp_path, cache_root):
    env = {**offline_env(cache_root), "PYTHONPATH": str(REPO)}
    one = fit(tmp_path / "one", env, "--data.batch_size", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    two = fit(tmp_path / "two", env, "--data.batch_size", "2", "--trainer.strategy", "ddp",
              "--trainer.devices", "2", "--export", "true")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two/runs/r/version_0/hf_model/config.json").is_file()  # rank zero exported, no deadlock
    assert len((tmp_path / "two/runs/r/version_0/samples.jsonl").read_text().splitlines()) == 5  # rank zero only
    # Same global batch (4 rows per optimizer step), same rows in every step: the same training.
    assert last_val_loss(tmp_path / "two/runs/r/version_0") == pytest.approx(
        last_val_loss(tmp_path / "one/runs/r/version_0"), abs=1e-4)
    steps_one = {e["step"]: sorted(e["rows"]) for e in map(json.loads, (tmp_path / "one/batches.jsonl").open())}
    steps_two: dict[int, list[int]] = {}
    for entry in map(json.loads, (tmp_path / "two/batches.jsonl").open()):  # both ranks append here
        steps_two.setdefault(entry["step"], []).extend(entry["rows"])
    assert {step: sorted(rows) for step, rows in steps_two.items()} == steps_one
    for epoch in (0, 1):  # every training row exactly once per epoch across the two ranks
        rows = [r for step, rs in steps_two.items() if step // 6 == epoch for r in rs]
        assert Counter(rows) == Counter(range(22))
