"""Reading a ``torch.distributed.checkpoint`` (DCP) folder without running code from it.

A sharded checkpoint (FSDP2's ``ModelParallelStrategy``) is a folder: ``.metadata``, one ``__<rank>_0.distcp``
shard file per rank, and Lightning's ``meta.pt``. torch's own reader runs code from such a folder twice over:
``FileSystemReader.read_metadata`` loads ``.metadata`` with plain ``pickle.load``, and ``DefaultLoadPlanner.load_bytes``
loads every non-tensor entry (optimizer ``param_groups``, …) with ``torch.load(weights_only=False)``. Here:

- :func:`read_dcp_metadata` unpickles ``.metadata`` admitting only the classes a DCP metadata file holds
  (torch's metadata dataclasses, tensor properties, dtypes, sizes, layouts, paths) and checks that every shard it
  names is a plain file name inside the folder;
- :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner` are torch's reader and planner with those two
  loads replaced (the second by ``torch.load(weights_only=True)``); medsft's own DCP loads use them;
- :func:`check_sharded_checkpoint` reads a folder's metadata and every non-tensor entry that way, so a folder
  that would run code is refused before any other reader (Lightning's resume, which uses torch's defaults) sees it.

Anything else raises :class:`UnsafeCheckpointError` with one line naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

METADATA_FILE = ".metadata"  # torch.distributed.checkpoint.filesystem's name for it

# (module, name) of every class or function a DCP .metadata file may name; dtypes are checked by type.
ALLOWED_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name ("torch.strided")
    ("torch", "Size"),
    ("collections", "OrderedDict"),
} | {("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")})


class UnsafeCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and plain values: refused, since loading it could run code."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class a checkpoint's metadata holds")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of a checkpoint's metadata")


def read_dcp_metadata(folder: str | Path) -> Metadata:
    """The folder's ``.metadata``, unpickled admitting only DCP's own metadata classes.

    Raises:
        UnsafeCheckpointError: the file names any other class or function, is no DCP metadata, or names a
            shard outside the folder.
    """
    path = Path(folder) / METADATA_FILE
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise _refused(path, err) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise _refused(path, f"it holds a {type(metadata).__name__}, not torch.distributed.checkpoint metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise _refused(path, f"it names a shard outside its folder: {name!r}")
    return metadata


def _refused(path: Path, why: Any) -> UnsafeCheckpointError:
    first = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
    return UnsafeCheckpointError(
        f"{path}: refused to load: {first}. medsft reads a sharded checkpoint's metadata admitting only "
        "torch.distributed.checkpoint's own classes, so that a checkpoint cannot run code; folders written by "
        "medsft fit load this way")


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` whose ``.metadata`` is read by :func:`read_dcp_metadata`, not ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # a per-rank metadata file (__<rank>.metadata): not what medsft writes
            raise UnsafeCheckpointError(f"{self.path}: per-rank metadata files are not read")
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """torch's default load planner whose non-tensor entries load with ``torch.load(weights_only=True)``
    (the same placement as ``DefaultLoadPlanner.load_bytes``, which loads them with ``weights_only=False``)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = _load_plain(fqn, value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeEmptyStateDictPlanner(SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """Loads whatever the checkpoint holds (under ``keys``) into an empty dict, non-tensors safely."""


def _load_plain(fqn: str, value: io.BytesIO) -> Any:
    """A non-tensor entry (an optimizer hyperparameter, a step count), unpickled with ``weights_only=True``."""
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"entry {fqn!r}: refused to load: {str(err).strip().splitlines()[0]}") from None


def check_sharded_checkpoint(folder: str | Path) -> Metadata:
    """Refuse a sharded checkpoint folder that would run code when torch or Lightning reads it.

    Reads ``.metadata`` with :func:`read_dcp_metadata` and every non-tensor entry with ``weights_only=True``
    (they are small: optimizer hyperparameters); tensor entries are read by torch with ``weights_only=True``
    anyway. Lightning's ``meta.pt`` is read with ``weights_only=True`` by whoever reads it.

    Raises:
        UnsafeCheckpointError: naming the file (and entry) that was refused.
    """
    folder = Path(folder)
    metadata = read_dcp_metadata(folder)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        shard = folder / info.relative_path
        if info.transform_descriptors:  # a compressed entry: its bytes are not the pickle itself
            raise UnsafeCheckpointError(f"{shard}: entry {index.fqn!r}: refused to load: stream transforms "
                                        f"{info.transform_descriptors} are not read (medsft writes none)")
        with shard.open("rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            _load_plain(index.fqn, io.BytesIO(data))
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{shard}: {err}") from None
    return metadata
