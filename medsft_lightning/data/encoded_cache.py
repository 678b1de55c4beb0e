"""Encoding a split once: a batched ``datasets.map`` whose result is cached on disk by content hash."""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

from medsft_lightning.data.encoding import encode_rows
from medsft_lightning.data.sources import fingerprint


def encode_cached(rows: list[dict], content: str, tokenizer, tokenizer_name: str, system_prompt: str,
                  max_length: int, cache_root: Path) -> list[dict | None]:
    """Encoded rows (``None`` where nothing is supervised), from ``cache_root/<key>`` when already there.

    The key hashes the rows' content fingerprint, the tokenizer (name, vocabulary size, chat template),
    the system prompt and ``max_length``: changing any of them re-encodes.
    """
    import datasets

    key = fingerprint(
        [{"rows": content, "tok": tokenizer_name, "vocab": len(tokenizer), "len": max_length,
          "sys": system_prompt, "tmpl": tokenizer.chat_template or "", "v": 2}]
    )
    cache = Path(cache_root) / key
    if (cache / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(cache))
    else:
        encode = partial(_encode_batch, tokenizer=tokenizer, system_prompt=system_prompt, max_length=max_length)
        # new_fingerprint: our own content key, so datasets does not pickle the tokenizer to hash it.
        ds = datasets.Dataset.from_list(rows).map(encode, batched=True, batch_size=256, new_fingerprint=key,
                                                  remove_columns=["question", "think", "answer"])
        tmp = cache.with_name(f"{key}.tmp-{os.getpid()}")  # ranks may race: write aside, then rename
        ds.save_to_disk(str(tmp))
        try:
            tmp.rename(cache)
        except OSError:  # another process got there first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return [None if not r["keep"] else r for r in ds]


def _encode_batch(batch: dict[str, list], tokenizer, system_prompt: str, max_length: int) -> dict[str, list]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    encoded = encode_rows(rows, tokenizer, system_prompt=system_prompt, max_length=max_length)
    empty = {"input_ids": [], "attention_mask": [], "labels": [], "num_supervised": 0, "truncated": False,
             "length": 0}
    out: dict[str, list] = {key: [] for key in [*empty, "keep"]}
    for enc in encoded:
        for key in empty:
            out[key].append((enc or empty)[key])
        out["keep"].append(enc is not None)
    return out
