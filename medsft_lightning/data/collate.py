"""Padding collation: a pure function from encoded rows to a batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pad_collate(
    rows: Sequence[dict],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into a batch.

    ``input_ids`` are padded with ``pad_id``, ``attention_mask`` with 0 and ``labels`` with -100, to
    the longest row (rounded up to ``pad_to_multiple_of`` when given). Keys other than these three
    that hold ints (``row_id``, ``window_tokens``) are stacked into 1-D tensors.

    Args:
        rows: dicts with ``input_ids``, ``attention_mask`` and ``labels`` (lists of int, same length).
        pad_id: the tokenizer's pad token id.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor-core friendly).

    Example:
        >>> b = pad_collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        ...                  {"input_ids": [8], "attention_mask": [1], "labels": [8]}], pad_id=0)
        >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [8, -100, -100]])
    """
    if not rows:
        raise ValueError("pad_collate got an empty batch")
    length = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {
        key: torch.tensor([list(r[key]) + [value] * (length - len(r[key])) for r in rows], dtype=torch.long)
        for key, value in fill.items()
    }
    for key in rows[0]:
        if key not in fill and isinstance(rows[0][key], int):
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    return batch
