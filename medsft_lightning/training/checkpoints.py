"""Checkpoint files: written atomically, read back safely, found again for ``--ckpt_path last``.

A single ``.ckpt`` file is written aside and renamed into place (:class:`AtomicCheckpointIO`); a sharded
checkpoint folder (FSDP2's ``ModelParallelStrategy``: one shard file per rank plus Lightning's ``meta.pt``)
is swapped in whole (:func:`swap_in_folder`, used by ``sharding.AtomicModelParallelStrategy``). Every file a
user hands us is read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint_file`), so it cannot run
code; a sharded folder's ``.metadata`` (a plain pickle in torch's format) is read admitting only torch's metadata
classes (``training/safe_dcp.py``), and its weights are gathered in one process (:func:`read_sharded_checkpoint`).
"""

from __future__ import annotations

import glob
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medsft_lightning.training.safe_dcp import (
    SafeEmptyStateDictPlanner,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    check_sharded_checkpoint,
)

META_FILE = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint (lightning.fabric.utilities.load)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync it, then rename it into place.

    A kill during saving leaves the previous checkpoint of that name whole (a rename is atomic on POSIX
    file systems); at worst a ``*.tmp-<pid>`` file stays behind, which the next save of the same name
    in this folder removes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync(target.parent)  # the rename itself survives a power cut


def load_checkpoint_file(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """``torch.load`` a checkpoint a user handed us: ``weights_only=True`` (only tensors and plain Python values
    are unpickled, so a crafted file cannot run code) and memory-mapped (a 10 GB checkpoint with its AdamW states
    is not read into RAM to take the weights: only the tensors used are paged in)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain Python values ({first}). "
            "medsft reads every checkpoint with torch.load(weights_only=True) so that a file cannot run code; "
            "checkpoints written by medsft load this way. If you wrote this file yourself and trust it, save its "
            "state_dict and hyper_parameters as plain values") from None


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds besides weights and optimizer states (loops, callbacks, DataModule state, …).

    A sharded folder keeps it in ``meta.pt`` (small); a ``.ckpt`` file is memory-mapped, so its tensors are
    not read.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        check_sharded_checkpoint(path)  # before anyone (Lightning's resume: torch's own reader) reads the shards
    return load_checkpoint_file(path / META_FILE if path.is_dir() else path)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A ``ModelParallelStrategy`` checkpoint folder (shards + ``meta.pt``), as opposed to a ``.ckpt`` file."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def read_sharded_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's full weights (``state_dict``) and Lightning's metadata, in one process.

    No process group is needed; the optimizer shards are not read. The whole model must fit in CPU memory.
    The folder is read without running code from it (``training/safe_dcp.py``).
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    check_sharded_checkpoint(folder)  # one clear error (torch would wrap the safe reader's in a CheckpointException)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeFileSystemReader(folder),
                     planner=SafeEmptyStateDictPlanner(keys={"state_dict"}), no_dist=True)
    meta = load_checkpoint_file(folder / META_FILE)
    return {**meta, "state_dict": state["state_dict"]}


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A ``.ckpt`` file (``weights_only=True``, memory-mapped), or a sharded checkpoint folder (ModelParallelStrategy)
    with its weights gathered in this process (optimizer shards not read)."""
    if is_sharded_checkpoint(ckpt_path):
        return read_sharded_checkpoint(ckpt_path)
    return load_checkpoint_file(ckpt_path)


def load_checkpoint_weights(module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's weights (no optimizer state) into a configured, unsharded module."""
    state = read_checkpoint(ckpt_path)["state_dict"]
    module.load_state_dict(state)  # strict: a key mismatch must fail, not export the wrong weights


def find_last_checkpoint(run_root: Path) -> Path | None:
    """The newest whole ``last*.ckpt`` in any ``<run_root>/version_*/checkpoints`` folder, or ``None``.

    A ``last*.ckpt`` may be a file or, under ModelParallelStrategy, a sharded checkpoint folder: shards
    plus Lightning's ``meta.pt``, written last, whose time dates the folder. A sharded save is swapped in
    by renames (:func:`swap_in_folder`); killed between them, ``last.ckpt`` is missing and its previous
    folder, whole, waits as ``last.ckpt.old-<step>``: that one counts instead. ``*.tmp-*`` never counts.
    """
    def stamp(path: Path) -> Path:
        return path / META_FILE if path.is_dir() else path

    found = []
    for path in Path(run_root).glob("version_*/checkpoints/last*.ckpt*"):
        base, _, tag = path.name.partition(".ckpt")
        if tag.startswith(".old-") and not is_whole(path.with_name(f"{base}.ckpt")):
            tag = ""  # the previous folder, set aside by a save that never renamed its new one into place
        if not tag and is_whole(path):
            found.append(path)
    return max(found, key=lambda p: stamp(p).stat().st_mtime, default=None)


def is_whole(path: Path) -> bool:
    """A checkpoint file, or a sharded folder with its ``meta.pt`` (rank zero writes it after all shards)."""
    return path.is_file() or (path / META_FILE).is_file()


def clear_leftovers(target: Path) -> None:
    """Delete what interrupted saves of ``target`` left beside it: every ``<target>.tmp-*``, and the
    ``<target>.old-*`` folders once ``target`` itself is whole (until then they are the fallback)."""
    pattern = glob.escape(target.name)
    leftovers = list(target.parent.glob(f"{pattern}.tmp-*"))
    if is_whole(target):
        leftovers += target.parent.glob(f"{pattern}.old-*")
    for path in leftovers:
        _remove(path)


def swap_in_folder(tmp: Path, target: Path, tag: str) -> None:
    """Put the finished checkpoint folder ``tmp`` in place of ``target``; rank zero calls it, after all
    ranks wrote into ``tmp``.

    The previous ``target`` is renamed aside to ``<target>.old-<tag>``, ``tmp`` renamed to ``target``, the
    folder fsynced, then the old one deleted. A kill at any point leaves a whole checkpoint under
    ``target`` or, between the two renames, under ``<target>.old-<tag>`` (:func:`find_last_checkpoint`).
    """
    for path in [*tmp.iterdir(), tmp]:  # the shards are fsynced by torch.distributed.checkpoint; meta.pt not
        _fsync(path)
    if target.exists() or target.is_symlink():
        os.replace(target, target.with_name(f"{target.name}.old-{tag}"))
    os.replace(tmp, target)
    _fsync(target.parent)
    clear_leftovers(target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

