"""Padding-free packing: several encoded rows concatenated into one sequence of at most ``max_length``.

Each packed row carries ``position_ids`` that restart at 0 for every example. Passed to a transformers
model with ``attention_mask=None`` (and no cache), those restarts make attention block-diagonal, in the layout
:func:`packed_model_inputs` picks for the attention implementation: ``[batch, L]`` rows with a block-diagonal
causal mask per row for sdpa/eager/flex, one flattened ``[1, batch * L]`` row with explicit ``cu_seq_lens``
for flash-attention's varlen kernel (which reads packing from ``position_ids`` only at batch 1). No token
attends across an example boundary, and the loss never crosses one either: the first label of every example
is masked (its prompt), so the last token of one example is never trained to predict the first token of the next.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from medsft_lightning.data.collate import IGNORE_INDEX
from medsft_lightning.data.sampler import PAD_INDEX


def pack_rows(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Group row indices into packs of at most ``capacity`` tokens (first-fit decreasing).

    Rows of equal length are ordered by a seeded shuffle, so the packs are deterministic for a seed.
    Each pack lists its rows longest first.

    >>> pack_rows([5, 3, 4, 2, 6], capacity=8)
    [[4, 3], [0, 1], [2]]
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a pack of {capacity}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle breaks ties
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            packs.append([i])
            room.append(capacity - lengths[i])
        else:
            packs[slot].append(i)
            room[slot] -= lengths[i]
    return packs


def concat_rows(rows: Sequence[dict]) -> dict:
    """One packed row from encoded rows: ids and labels concatenated, ``position_ids`` restarting at 0."""
    packed: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        labels = list(row["labels"])
        labels[0] = IGNORE_INDEX  # never predict across the boundary (already true for chat-encoded rows)
        packed["input_ids"] += row["input_ids"]
        packed["labels"] += labels
        packed["position_ids"] += range(len(row["input_ids"]))
    return packed


class PackedDataset(torch.utils.data.Dataset):
    """Packs of encoded rows, indexed by ints or by the sampler's ``(pack index, window_tokens)`` pairs.

    Args:
        rows: encoded rows (``input_ids``, ``labels``, ``num_supervised``).
        packs: row indices of each pack (see :func:`pack_rows`).
    """

    def __init__(self, rows: list[dict], packs: list[list[int]]) -> None:
        self.rows, self.packs = rows, packs
        self.num_supervised = [sum(rows[i]["num_supervised"] for i in p) for p in packs]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, window = key if isinstance(key, tuple) else (key, None)
        members = [self.rows[i] for i in self.packs[max(index, 0)]]
        packed = concat_rows(members)
        packed["row_ids"] = [r.get("row_id", -1) for r in members]
        if index == PAD_INDEX:  # keeps data-parallel ranks in step; trains on nothing
            packed["labels"] = [IGNORE_INDEX] * len(packed["labels"])
            packed["row_ids"] = []
        if window is not None:
            packed["window_tokens"] = window
        return packed


def pack_collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into a batch; padding gets its own ``position_ids`` run from 0 and label -100.

    ``attention_mask`` marks real tokens (for counting); the model must be called with
    ``attention_mask=None`` and ``position_ids`` so attention follows the example boundaries.

    Example:
        >>> b = pack_collate([{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]},
        ...                   {"input_ids": [9, 4], "labels": [-100, 4], "position_ids": [0, 1]}], pad_id=0)
        >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist()
        ([[5, 6, 7, 8], [9, 4, 0, 0]], [[0, 1, 0, 1], [0, 1, 0, 1]], [[-100, 6, -100, 8], [-100, 4, -100, -100]])
        >>> b["attention_mask"].tolist()
        [[1, 1, 1, 1], [1, 1, 0, 0]]
    """
    if not items:
        raise ValueError("pack_collate got an empty batch")
    width = max(len(item["input_ids"]) for item in items)
    batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for item in items:
        pad = width - len(item["input_ids"])
        batch["input_ids"].append(list(item["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(item["labels"]) + [IGNORE_INDEX] * pad)
        batch["position_ids"].append(list(item["position_ids"]) + list(range(pad)))
        batch["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
    out = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
    if "row_ids" in items[0]:  # which rows each packed sequence holds (-1: none), for error messages
        most = max(1, max(len(item["row_ids"]) for item in items))
        out["row_id"] = torch.tensor([item["row_ids"] + [-1] * (most - len(item["row_ids"])) for item in items])
    if "window_tokens" in items[0]:
        out["window_tokens"] = torch.tensor([item["window_tokens"] for item in items], dtype=torch.long)
    return out


# Attention implementations whose transformers mask builder (``masking_utils.create_causal_mask``) turns restarting
# ``position_ids`` into a block-diagonal causal mask for every row of a ``[batch, L]`` batch.
ROW_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")


def packed_model_inputs(batch: dict[str, torch.Tensor], attn_implementation: str | None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(input_ids, labels, kwargs)`` for the decoder: a batch in the layout ``attn_implementation`` reads right.

    A padded batch (no ``position_ids``) goes as it is, with its ``attention_mask``. A packed batch
    (:func:`pack_collate`) goes with its ``position_ids`` and ``attention_mask=None`` (the caller passes
    ``use_cache=False``: with a cache, transformers skips the packed-sequence detection), laid out as follows:

    - ``sdpa``, ``eager``, ``flex_attention``: the ``[batch, L]`` rows unchanged. transformers'
      ``masking_utils.find_packed_sequence_indices`` finds the example runs of every row, and
      ``create_causal_mask`` builds a block-diagonal causal mask per row (``B * L**2`` attention work; one
      flattened row would cost ``(B * L)**2``).
    - Any flash-attention implementation (``"flash"`` in the name, as transformers'
      ``utils.generic.is_flash_attention_requested`` decides: ``flash_attention_2/3/4``, hub kernels such as
      ``kernels-community/flash-attn2``): its mask is ``None`` and ``_flash_attention_forward`` infers packing
      from ``position_ids`` only when the batch is 1 (``_is_packed_sequence``); at batch > 1 each row would run
      as one causal sequence, every example attending to those before it. So the rows are flattened into one
      ``[1, B * L]`` row, and ``cu_seq_lens_q/k`` (int32 starts of every run of positions from 0) and
      ``max_length_q/k`` are passed too, for the varlen branch (no re-derivation in every layer). Each row's
      padding has its own positions from 0, so it becomes a sequence of its own (length 1 is fine; no padding,
      no sequence) with labels -100; each row's first label is set to -100, so the last token of one row is
      never trained to predict the first token of the next (it is the first example's masked prompt anyway).
    - Anything else (``paged|eager`` builds no causal mask; an unknown kernel): ``ValueError``.

    Example:
        >>> two = {"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "position_ids": [0, 1, 0, 1]}
        >>> batch = pack_collate([two, {"input_ids": [9], "labels": [-100], "position_ids": [0]}], pad_id=0)
        >>> ids, labels, kw = packed_model_inputs(batch, "flash_attention_2")
        >>> ids.tolist(), kw["position_ids"].tolist()
        ([[5, 6, 7, 8, 9, 0, 0, 0]], [[0, 1, 0, 1, 0, 0, 1, 2]])
        >>> labels.tolist()
        [[-100, 6, -100, 8, -100, -100, -100, -100]]
        >>> kw["cu_seq_lens_q"].tolist(), kw["max_length_q"], kw["attention_mask"]
        ([0, 2, 4, 5, 8], 3, None)
        >>> ids, labels, kw = packed_model_inputs(batch, "sdpa")
        >>> ids.shape, sorted(kw)
        (torch.Size([2, 4]), ['attention_mask', 'position_ids'])
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    if "position_ids" not in batch:
        return input_ids, labels, {"attention_mask": batch["attention_mask"]}
    position_ids = batch["position_ids"]
    name = attn_implementation or ""
    if name in ROW_MASK_ATTENTION:
        return input_ids, labels, {"position_ids": position_ids, "attention_mask": None}
    if "flash" not in name:
        raise ValueError(
            f"--data.batching pack cannot keep attention inside each example with --model.attn_implementation "
            f"{attn_implementation}: medsft knows how transformers reads packed rows only for sdpa, eager, "
            "flex_attention and flash-attention (varlen) implementations. Use --model.attn_implementation sdpa "
            "(or flash_attention_2 on GPU with flash-attn installed), or --data.batching group_by_length")
    labels = labels.clone()
    labels[:, 0] = IGNORE_INDEX  # in one flat row, a row's last token would predict the next row's first
    flat_positions = position_ids.reshape(1, -1)
    starts = (flat_positions[0] == 0).nonzero().view(-1)
    total = torch.tensor([flat_positions.size(1)], device=starts.device)
    cu_seq_lens = torch.cat([starts, total]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())  # an int, as flash_attn_varlen_func wants (one sync per step)
    kwargs = {"position_ids": flat_positions, "attention_mask": None, "cu_seq_lens_q": cu_seq_lens,
              "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length, "max_length_k": max_length}
    return input_ids.reshape(1, -1), labels.reshape(1, -1), kwargs
