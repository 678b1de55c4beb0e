"""Hub: where models, tokenizers and datasets come from; the only place that reaches a model/dataset hub.

The bottom of the package: it imports no other medsft stage, and every stage may import it. Besides the
downloads here (tests replace ``download_model``/``download_hf_model``/``download_dataset``) it holds the
offline defaults: the tiny random Qwen3 with a real-vocabulary tokenizer (``tiny``, also ``medsft tiny``)
and the packaged sample dataset (``sample_data/``).

Names users can give:
- a local folder (or file, for datasets): used as it is, nothing is downloaded;
- ``medsft:tiny-qwen3`` / ``medsft:sample``: the offline tiny model / the packaged sample dataset;
- ``hf://owner/name``: a Hugging Face id, downloaded with ``huggingface_hub.snapshot_download``;
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
# config.json, generation_config.json and the tokenizer's files; no weights.
TOKENIZER_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
WEIGHT_FILES = ["*.safetensors", "*.bin", "*.pt", "*.pth"]


def medsft_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """medsft's own cache (tiny model, encoded rows): ``cache_dir``, else ``MEDSFT_CACHE``, else ~/.cache/medsft."""
    return Path(cache_dir or os.environ.get("MEDSFT_CACHE") or Path.home() / ".cache" / "medsft")


def download_model(model_id: str, revision: str | None, cache_dir: str | None, allow_patterns=None,
                   local_files_only: bool = False) -> str:
    """Download a ModelScope model snapshot (safe to re-run: cached files are reused).

    With ``local_files_only`` nothing is downloaded: ModelScope returns the cached snapshot or raises
    ``CacheNotFound`` (``modelscope_hub.errors``) at once.
    """
    from modelscope import snapshot_download  # lazy: importing modelscope costs ~2 s

    return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                             local_files_only=local_files_only)


def download_hf_model(repo_id: str, revision: str | None, cache_dir: str | None, allow_patterns=None,
                      local_files_only: bool = False) -> str:
    """Download a Hugging Face model snapshot and return its local folder (cached files are reused).

    With ``local_files_only`` nothing is downloaded: the cached snapshot, or ``LocalEntryNotFoundError``.
    """
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                             allow_patterns=allow_patterns, local_files_only=local_files_only)


def download_dataset(dataset_id: str, revision: str | None, cache_dir: str | None) -> str:
    """Download a ModelScope dataset repository snapshot and return its local folder."""
    from modelscope import dataset_snapshot_download

    return dataset_snapshot_download(dataset_id, revision=revision, cache_dir=cache_dir)


def resolve_model(
    name_or_path: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    tokenizer_only: bool = False,
    local_first: bool = False,
) -> str:
    """Return a local folder ``from_pretrained`` can load for ``name_or_path`` (downloading if needed).

    Args:
        name_or_path: a local folder, ``medsft:tiny-qwen3``, ``hf://owner/name`` (Hugging Face) or
            ``owner/name`` (ModelScope).
        revision: branch, tag or commit of a hub model (``model.model_revision``).
        cache_dir: the hub's download cache (``None``: the hub's default).
        tokenizer_only: fetch only ``config.json``, ``generation_config.json`` and the tokenizer's files
            (``TOKENIZER_FILES``), no weights: enough for a tokenizer, a config or an export's metadata.
        local_first: look in the download cache first (``local_files_only=True``, no network); only when
            that fails download as usual. The hubs return a cached snapshot without checking that every file
            is there, so a full fetch also counts a cached snapshot without weights (say, from an earlier
            ``tokenizer_only`` fetch) as a miss.
    """
    if name_or_path == TINY_MODEL:
        from medsft_lightning.hub.tiny import ensure_tiny_qwen3

        return str(ensure_tiny_qwen3(medsft_cache(cache_dir)))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    hf = name_or_path.startswith(HF_PREFIX)
    repo_id, hub_name = (name_or_path[len(HF_PREFIX) :], "Hugging Face") if hf else (name_or_path, "ModelScope")
    patterns = TOKENIZER_FILES if tokenizer_only else None

    def fetch(**only_cached: bool) -> str:  # looked up at call time, so tests can replace the functions
        download = download_hf_model if hf else download_model
        return download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, **only_cached)

    what = f"{repo_id} from {hub_name} (revision {revision or 'default'})"
    if local_first:
        try:
            cached = fetch(local_files_only=True)
        except Exception as err:  # ModelScope's CacheNotFound, huggingface_hub's LocalEntryNotFoundError, ...
            logger.info("%s is not in the download cache (%s: %s)", what, type(err).__name__, err)
        else:
            if tokenizer_only or any(any(Path(cached).glob(w)) for w in WEIGHT_FILES):
                return cached
            logger.info("%s: the cached snapshot %s holds no weights", what, cached)
    logger.info("Downloading %s", what)
    return fetch()


def sample_dataset_path() -> Path:
    """The packaged sample dataset (real schema, written for medsft)."""
    return Path(str(resources.files("medsft_lightning.hub").joinpath("sample_data/medical_sample.jsonl")))


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
