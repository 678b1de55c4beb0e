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
MEGA_BATCHES = 16  # group_by_length sorts this many global batches at a time


class _EpochHook:
    """The ``batch_sampler.sampler`` Lightning looks for: forwards ``set_epoch`` to the batch sampler."""

    def __init__(self, owner: WindowBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


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
        lengths: token count of every row; with ``group_by_length`` rows of similar length share batches.
        group_by_length: after the shuffle, sort each mega-batch of ``MEGA_BATCHES`` global batches by length
            (longest first) and shuffle the order of the global batches, so padding is small while every
            epoch still mixes rows; every rank computes the same order, so ranks stay in step.
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
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
    ) -> None:
        if batch_size < 1 or accumulate < 1:
            raise ValueError(f"batch_size and accumulate must be >= 1, got {batch_size}, {accumulate}")
        self.num_supervised = list(num_supervised)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.shuffle, self.seed = shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        if group_by_length and (lengths is None or len(lengths) != len(self.num_supervised)):
            raise ValueError("group_by_length needs the token length of every row")
        self.lengths, self.group_by_length = lengths, group_by_length
        self.epoch = 0
        self.resume: tuple[int, int] | None = None
        # Lightning calls set_epoch on `dataloader.sampler` and `batch_sampler.sampler`, never on a batch
        # sampler itself: without this every epoch would replay epoch 0's order.
        self.sampler = _EpochHook(self)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Resuming mid-epoch: in ``epoch``, skip the first ``batches_done`` micro-batches of this rank."""
        self.resume = (epoch, batches_done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.resume is not None and epoch != self.resume[0]:
            self.resume = None  # the resumed epoch is over

    def _rank_batches(self) -> list[list[list[int]]]:
        """Per rank, its list of batches of row indices (PAD_INDEX fills the last slots)."""
        order = list(range(len(self.num_supervised)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            order = self._grouped(order, rng)
        per_rank = -(-len(order) // self.num_replicas)
        order += [PAD_INDEX] * (per_rank * self.num_replicas - len(order))
        return [
            [shard[i : i + self.batch_size] for i in range(0, per_rank, self.batch_size)]
            for shard in (order[r :: self.num_replicas] for r in range(self.num_replicas))
        ]

    def _grouped(self, order: list[int], rng: random.Random) -> list[int]:
        """``order`` with each mega-batch sorted by length and the global batches in shuffled order."""
        step = self.batch_size * self.num_replicas  # one global batch: rank r takes every r-th row of it
        mega = step * MEGA_BATCHES
        ordered = []
        for start in range(0, len(order), mega):
            ordered += sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
        batches = [ordered[i : i + step] for i in range(0, len(ordered), step)]
        last = batches.pop() if len(batches[-1]) < step else None  # a short batch stays last (padded slots)
        if self.shuffle:
            rng.shuffle(batches)
        return [i for batch in batches + ([last] if last else []) for i in batch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ranks = self._rank_batches()
        mine = ranks[self.rank]
        skip = self.resume[1] if self.resume is not None and self.resume[0] == self.epoch else 0
        for start in range(0, len(mine), self.accumulate):
            window = sum(
                self.num_supervised[i]
                for batches in ranks
                for batch in batches[start : start + self.accumulate]
                for i in batch
                if i != PAD_INDEX
            )
            for k, batch in enumerate(mine[start : start + self.accumulate], start=start):
                if k >= skip:
                    yield [(i, window) for i in batch]

    def __len__(self) -> int:
        per_rank = -(-len(self.num_supervised) // self.num_replicas)
        return -(-per_rank // self.batch_size)


def shard_rows(n: int, num_replicas: int = 1, rank: int = 0) -> list[int]:
    """This rank's share of ``n`` evaluation rows: rows ``rank``, ``rank + W``, … padded with ``PAD_INDEX``.

    Every rank gets ``ceil(n / W)`` slots, so every rank runs the same number of batches (under FSDP2 a
    forward is a collective of all ranks: unequal counts would hang). A padded slot supervises no token, so
    token-weighted means over the ranks stay exact.
    """
    mine = list(range(rank, n, num_replicas))
    return mine + [PAD_INDEX] * (-(-n // num_replicas) - len(mine))
