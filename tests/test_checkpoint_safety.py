"""A checkpoint a user hands us never runs code: crafted sharded folders (a pickle payload in ``.metadata``, or in
a non-tensor entry of a shard) and a crafted ``.ckpt`` are refused by every command that takes a checkpoint, with
one line naming the file, and the payload's marker file never appears."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from medsft_lightning.cli import cli_main
from medsft_lightning.training.checkpoints import UnsafeCheckpointError, read_checkpoint


class Payload:
    """Unpickling this writes ``marker``: what an attacker's checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def hparams(tiny_dir: Path) -> dict:
    return {"model_name_or_path": str(tiny_dir), "learning_rate": 1e-3}


def dcp_folder(folder: Path, state: dict, tiny_dir: Path) -> Path:
    """A sharded checkpoint folder as FSDP2 writes it (``.metadata`` + shard + Lightning's ``meta.pt``)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    _save_state_dict(state, storage_writer=FileSystemWriter(folder), no_dist=True)
    torch.save({"hyper_parameters": hparams(tiny_dir), "global_step": 2}, folder / "meta.pt")
    return folder


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def crafted(tmp_path, tiny_dir, marker) -> dict[str, Path]:
    """Three checkpoints that would run the payload if read the usual way."""
    weights = {"state_dict": {"model.model.norm.weight": torch.ones(64)}}
    metadata = dcp_folder(tmp_path / "metadata.ckpt", weights, tiny_dir)
    (metadata / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    entry = dcp_folder(tmp_path / "entry.ckpt", {**weights, "optimizer_0": {"param_groups": [Payload(marker)]}},
                       tiny_dir)
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": weights["state_dict"], "hyper_parameters": hparams(tiny_dir), "x": Payload(marker)},
               ckpt)
    return {"metadata": metadata, "entry": entry, "ckpt": ckpt}


def test_the_payloads_do_run_when_read_the_usual_way(crafted, marker):
    """The control: torch's own readers run the payload of each, so the refusals below can fail."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    for name in ("metadata", "entry"):
        marker.unlink(missing_ok=True)
        try:
            _load_state_dict({}, storage_reader=FileSystemReader(crafted[name]), planner=_EmptyStateDictLoadPlanner(),
                             no_dist=True)
        except (Exception, CheckpointException):  # the payload's value is no Metadata: torch fails after running it
            pass
        assert marker.exists(), name
    marker.unlink()
    torch.load(crafted["ckpt"], weights_only=False)
    assert marker.exists()


def test_medsft_reads_a_clean_sharded_folder_and_its_plain_entries(tmp_path, tiny_dir):
    """What torch's own writer puts in .metadata (bf16 tensor properties, optimizer hyperparameters as bytes
    entries) passes the allowlist; tests/test_fsdp.py resumes and exports real 2-rank FSDP2 folders through it."""
    from medsft_lightning.training.safe_dcp import check_sharded_checkpoint

    state = {"state_dict": {"model.w": torch.arange(6.0).reshape(2, 3).to(torch.bfloat16)},
             "optimizer_0": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None}]}}
    folder = dcp_folder(tmp_path / "clean.ckpt", state, tiny_dir)
    check_sharded_checkpoint(folder)
    got = read_checkpoint(folder)
    assert torch.equal(got["state_dict"]["model.w"], state["state_dict"]["model.w"])
    assert got["hyper_parameters"] == hparams(tiny_dir) and got["global_step"] == 2


@pytest.mark.parametrize("name", ["metadata", "entry", "ckpt"])
def test_read_checkpoint_refuses_each_crafted_form(crafted, marker, name):
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as err:
        read_checkpoint(crafted[name])
    assert str(crafted[name]) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_shard_outside_the_folder_is_refused(tmp_path, tiny_dir):
    from medsft_lightning.training.safe_dcp import read_dcp_metadata

    folder = dcp_folder(tmp_path / "f.ckpt", {"state_dict": {"w": torch.ones(2)}}, tiny_dir)
    metadata = read_dcp_metadata(folder)
    for info in metadata.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="names a shard outside its folder: '../../etc/passwd'"):
        read_dcp_metadata(folder)


def test_the_safe_planner_loads_plain_entries_and_refuses_pickles():
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from medsft_lightning.training.safe_dcp import SafeLoadPlanner

    planner = SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("lr"), torch.Size([0]), MetadataIndex("lr"), torch.Size([0]),
                    torch.Size([0]))
    buf = io.BytesIO()
    torch.save({"lr": 0.5, "betas": (0.9, 0.95)}, buf)
    buf.seek(0)
    planner.load_bytes(item, buf)
    assert planner.state_dict["lr"] == {"lr": 0.5, "betas": (0.9, 0.95)}


COMMANDS = {  # every command that takes a checkpoint, with the rest of its command line
    "export": lambda c, tmp: ["export", str(c), str(tmp / "out")],
    "chat": lambda c, tmp: ["chat", str(c)],
    "webchat": lambda c, tmp: ["webchat", str(c), "--port", "0"],
    "compare": lambda c, tmp: ["compare", "--model", str(c), "--base", str(c), "--questions", str(tmp / "q.jsonl"),
                               "--out", str(tmp / "cmp")],
    "eval": lambda c, tmp: ["eval", str(c), "--output_dir", str(tmp / "eval"), "--swanlab", "disabled"],
    "serve": lambda c, tmp: ["serve", str(c), "--vllm_python", "/nonexistent/python"],
    "fit": lambda c, tmp: ["fit", "--config", "configs/demo.yaml", "--ckpt_path", str(c)],
    "validate": lambda c, tmp: ["validate", "--config", "configs/demo.yaml", "--ckpt_path", str(c)],
    "predict": lambda c, tmp: ["predict", "--config", "configs/demo.yaml", "--ckpt_path", str(c)],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_crafted_checkpoints_in_one_line(command, crafted, marker, tmp_path, capsys,
                                                               monkeypatch, cache_root):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("MEDSFT_CACHE", str(cache_root))
    (tmp_path / "q.jsonl").write_text('{"question": "What helps a headache?"}\n')
    for name, ckpt in crafted.items():
        with pytest.raises(SystemExit) as exit_:
            cli_main(COMMANDS[command](ckpt, tmp_path))
        message = str(exit_.value.code)
        assert "error" in message and str(ckpt) in message and "refused" in message, (name, message)
        assert "\n" not in message.strip(), (name, message)
        assert "Traceback" not in capsys.readouterr().err
        assert not marker.exists(), (command, name)
