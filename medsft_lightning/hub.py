"""The only place that reaches a model/dataset hub. Tests replace ``download_model``/``download_dataset``.

Names users can give:
- a local folder (or file, for datasets): used as it is, nothing is downloaded;
- ``medsft:tiny-qwen3`` / ``medsft:sample``: the offline tiny model / the packaged sample dataset;
- ``hf://owner/name``: a Hugging Face id, left to ``from_pretrained``;
- ``owner/name``: a ModelScope id, downloaded with ModelScope's own snapshot API.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_MODEL = "medsft:tiny-qwen3"
SAMPLE_DATASET = "medsft:sample"
HF_PREFIX = "hf://"
TOKENIZER_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def medsft_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """medsft's own cache (tiny model, encoded rows): ``cache_dir``, else ``MEDSFT_CACHE``, else ~/.cache/medsft."""
    return Path(cache_dir or os.environ.get("MEDSFT_CACHE") or Path.home() / ".cache" / "medsft")


def download_model(model_id: str, revision: str | None, cache_dir: str | None, allow_patterns=None) -> str:
    """Download a ModelScope model snapshot (safe to re-run: cached files are reused)."""
    from modelscope import snapshot_download  # lazy: importing modelscope costs ~2 s

    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)


def download_dataset(dataset_id: str, revision: str | None, cache_dir: str | None) -> str:
    """Download a ModelScope dataset repository snapshot and return its local folder."""
    from modelscope import dataset_snapshot_download

    return dataset_snapshot_download(dataset_id, revision=revision, cache_dir=cache_dir)


def resolve_model(
    name_or_path: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    tokenizer_only: bool = False,
) -> str:
    """Return something ``from_pretrained`` can load for ``name_or_path`` (downloading if needed)."""
    if name_or_path == TINY_MODEL:
        from medsft_lightning.tiny import ensure_tiny_qwen3

        return str(ensure_tiny_qwen3(cache_dir))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    if name_or_path.startswith(HF_PREFIX):
        return name_or_path[len(HF_PREFIX) :]
    logger.info("Downloading %s from ModelScope (revision %s)", name_or_path, revision or "default")
    patterns = TOKENIZER_FILES if tokenizer_only else None
    return download_model(name_or_path, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)


def sample_dataset_path() -> Path:
    """The packaged sample dataset (real schema, written for medsft)."""
    return Path(str(resources.files("medsft_lightning").joinpath("sample_data/medical_sample.jsonl")))


def resolve_dataset(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Return a local file or folder for a dataset name, path or ModelScope id (downloading if needed)."""
    if name_or_path == SAMPLE_DATASET:
        return sample_dataset_path()
    local = Path(os.path.expandvars(name_or_path)).expanduser()
    if local.exists():
        return local
    if local.suffix in {".json", ".jsonl"} or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(
            f"data.dataset={name_or_path!r}: no such file or folder, and it is not a ModelScope id "
            "('owner/name'). Give a .jsonl/.json file, a folder of them, or a ModelScope dataset id."
        )
    logger.info("Downloading dataset %s from ModelScope (revision %s)", name_or_path, revision or "default")
    return Path(download_dataset(name_or_path, revision=revision, cache_dir=cache_dir))
