"""Sharded (FSDP2) checkpoint folders swapped in whole: every state a kill can leave resolves to a whole
checkpoint (folders on disk, one process), and 2 real FSDP2 processes killed between the swap's renames
resume from the previous checkpoint to the uninterrupted run's val_loss."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from medsft_lightning.training import checkpoints
from medsft_lightning.training.checkpoints import clear_leftovers, find_last_checkpoint, swap_in_folder
from tests.conftest import make_rows, offline_env, write_jsonl
from tests.test_fsdp import FSDP2, MEDSFT, rows_by_step
from tests.test_resume import REPO, last_val_loss, write_config


def folder(path: Path, step: int, whole: bool = True) -> Path:
    """A sharded checkpoint folder of ``step``; ``whole=False``: shards written, ``meta.pt`` not yet."""
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(bytes([step]) * 64)
    if whole:
        torch.save({"global_step": step}, path / "meta.pt")
    return path


def step_of(path: Path) -> int:
    return torch.load(path / "meta.pt", weights_only=False)["global_step"]


# What a kill leaves in checkpoints/ at each point of saving step 6 over last.ckpt of step 4 → the folder chosen.
KILLED_STATES = {
    "writing tmp": ({"last.ckpt": 4, "last.ckpt.tmp-6": None}, "last.ckpt", 4),
    "tmp written": ({"last.ckpt": 4, "last.ckpt.tmp-6": 6}, "last.ckpt", 4),
    "old set aside": ({"last.ckpt.old-6": 4, "last.ckpt.tmp-6": 6}, "last.ckpt.old-6", 4),
    "new in place": ({"last.ckpt": 6, "last.ckpt.old-6": 4}, "last.ckpt", 6),
    "deleting old": ({"last.ckpt": 6, "last.ckpt.old-6": None}, "last.ckpt", 6),
    "only tmp": ({"last.ckpt.tmp-6": 6}, None, None),
    "old, new torn": ({"last.ckpt": None, "last.ckpt.old-6": 4}, "last.ckpt.old-6", 4),
}


@pytest.mark.parametrize("state", KILLED_STATES)
def test_find_last_checkpoint_after_a_kill_in_every_state(tmp_path, state):
    layout, chosen, step = KILLED_STATES[state]
    ckpts = tmp_path / "version_0/checkpoints"
    for name, saved in layout.items():
        folder(ckpts / name, saved or 1, whole=saved is not None)
    folder(ckpts / "best.ckpt", 9)  # not a last*.ckpt: never chosen
    found = find_last_checkpoint(tmp_path)
    assert (found.name if found else None, step_of(found) if found else None) == (chosen, step)


def test_old_fallback_competes_by_age_across_versions(tmp_path):
    old = folder(tmp_path / "version_0/checkpoints/last.ckpt.old-6", 4)
    newer = folder(tmp_path / "version_1/checkpoints/last.ckpt", 8)
    os.utime(old / "meta.pt", (1_000, 1_000))
    assert find_last_checkpoint(tmp_path) == newer
    os.utime(old / "meta.pt", (4_000_000_000, 4_000_000_000))
    assert find_last_checkpoint(tmp_path) == old


def test_swap_replaces_the_folder_and_clears_leftovers(tmp_path):
    folder(tmp_path / "last.ckpt", 4)
    folder(tmp_path / "last.ckpt.tmp-2", 2, whole=False)  # from a save killed earlier
    folder(tmp_path / "last.ckpt.old-2", 1)
    folder(tmp_path / "best.ckpt", 3)
    clear_leftovers(tmp_path / "last.ckpt")  # before writing: last.ckpt is whole, its leftovers go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    swap_in_folder(folder(tmp_path / "last.ckpt.tmp-6", 6), tmp_path / "last.ckpt", "6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (step_of(tmp_path / "last.ckpt"), step_of(tmp_path / "best.ckpt")) == (6, 3)


def test_swap_killed_between_renames_then_the_next_save_recovers(tmp_path, monkeypatch):
    ckpts = tmp_path / "version_0/checkpoints"
    folder(ckpts / "last.ckpt", 4)
    real_replace, calls = os.replace, []

    def die_on_second(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        swap_in_folder(folder(ckpts / "last.ckpt.tmp-6", 6), ckpts / "last.ckpt", "6")
    monkeypatch.undo()
    assert calls == ["last.ckpt", "last.ckpt.tmp-6"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt.old-6", "last.ckpt.tmp-6"]
    assert find_last_checkpoint(tmp_path) == ckpts / "last.ckpt.old-6"
    clear_leftovers(ckpts / "last.ckpt")  # the next save: last.ckpt missing, so the fallback stays
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt.old-6"]
    swap_in_folder(folder(ckpts / "last.ckpt.tmp-8", 8), ckpts / "last.ckpt", "8")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert step_of(ckpts / "last.ckpt") == 8


# -- end to end: 2 FSDP2 processes of medsft fit killed inside the swap, then resumed -----------------------------
def fit(work: Path, env: dict, kill_at_step: int, batch_size: str, *extra: str) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(work / "rows.jsonl", make_rows(25, answer_words=6))  # 22 train rows (int(25 * 0.9))
    log = "killed.jsonl" if kill_at_step else "batches.jsonl" if "--ckpt_path" not in extra else "resumed.jsonl"
    config = write_config(work, data, {"log": str(work / log)})
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "tests.atomic_probe.KillInSwap",
                                        "init_args": {"at_step": kill_at_step or 10_000}})
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    # A session of its own: the probe kills the process group (every rank), as a preemption would.
    return subprocess.run([MEDSFT, "fit", "--config", str(config), "--data.batch_size", batch_size, *extra],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)


@pytest.mark.skipif(not Path(MEDSFT).exists(), reason="needs the installed medsft console script")
@pytest.mark.e2e
def test_fsdp2_killed_between_the_swap_renames_resumes_from_the_previous_folder(tmp_path, cache_root):
    env = {**offline_env(cache_root), "PYTHONPATH": str(REPO)}
    one = fit(tmp_path / "one", env, 0, "4")
    assert one.returncode == 0, one.stderr[-3000:]

    work = tmp_path / "two"
    killed = fit(work, env, 6, "2", *FSDP2)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "renamed into place once every rank has written" in killed.stderr + killed.stdout
    ckpts = work / "runs/r/version_0/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt.old-6", "last.ckpt.tmp-6"]
    assert (step_of(ckpts / "last.ckpt.old-6"), step_of(ckpts / "last.ckpt.tmp-6")) == (4, 6)

    resumed = fit(work, env, 0, "2", *FSDP2, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    printed = resumed.stderr + resumed.stdout
    assert "--ckpt_path last → runs/r/version_0/checkpoints/last.ckpt.old-6\n" in printed
    assert "resuming epoch 0 after its first 4 micro-batches" in printed
    first = json.loads((work / "resumed.jsonl").read_text().splitlines()[0])
    assert (first["step"], first["batch_idx"]) == (4, 4)
    killed_rows = {s: rows for s, rows in rows_by_step(work / "killed.jsonl").items() if s < 4}
    assert {**killed_rows, **rows_by_step(work / "resumed.jsonl")} == rows_by_step(tmp_path / "one/batches.jsonl")
    run = work / "runs/r/version_1"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert step_of(run / "checkpoints/last.ckpt") == 12
    assert last_val_loss(run) == pytest.approx(last_val_loss(tmp_path / "one/runs/r/version_0"), abs=1e-4)
