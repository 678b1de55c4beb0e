"""Batch sampling that knows the optimizer step: each micro-batch carries its window's token count.

The loss of an optimizer step must be the mean over every supervised token of that step, however the
step is split into gradient-accumulation micro-batches and ranks. The sampler knows every rank's
batches in advance (same seed everywhere), so it can hand each micro-batch the number of supervised
tokens in its whole accumulation window across all ranks: ``window_tokens``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

PAD_INDEX = -1  # a slot that keeps ranks in step; the dataset turns it into a row with no supervision


class WindowBatchSampler:
    """Yields lists of ``(row index, window_tokens)`` pairs, one list per micro-batch of this rank.

    Args:
        num_supervised: supervised-token count of every row.
        batch_size: rows per micro-batch.
        accumulate: micro-batches per optimizer step (``trainer.accumulate_grad_batches``).
        shuffle: reshuffle every epoch (seeded by ``seed + epoch``); otherwise keep order.
        seed: shuffling seed.
        num_replicas: number of data-parallel ranks.
        rank: this rank.
    """

    def __init__(
        self,
        num_supervised: Sequence[int],
        batch_size: int,
        accumulate: int = 1,
        shuffle: bool = True,
        seed: int = 42,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {batch_size}, {accumulate}")
        self.num_supervised = list(num_supervised)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.shuffle, self.seed = shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_batches(self) -> list[list[list[int]]]:
        """Per rank, its list of batches of row indices (PAD_INDEX fills the last slots)."""
        order = list(range(len(self.num_supervised)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        per_rank = -(-len(order) // self.num_replicas)
        order += [PAD_INDEX] * (per_rank * self.num_replicas - len(order))
        return [
            [shard[i : i + self.batch_size] for i in range(0, per_rank, self.batch_size)]
            for shard in (order[r :: self.num_replicas] for r in range(self.num_replicas))
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ranks = self._rank_batches()
        mine = ranks[self.rank]
        for start in range(0, len(mine), self.accumulate):
            window = sum(
                self.num_supervised[i]
                for batches in ranks
                for batch in batches[start : start + self.accumulate]
                for i in batch
                if i != PAD_INDEX
            )
            for batch in mine[start : start + self.accumulate]:
                yield [(i, window) for i in batch]

    def __len__(self) -> int:
        per_rank = -(-len(self.num_supervised) // self.num_replicas)
        return -(-per_rank // self.batch_size)
