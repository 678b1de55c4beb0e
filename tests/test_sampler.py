from collections import Counter

from medsft_lightning.data.sampler import PAD_INDEX, WindowBatchSampler

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


def test_windows_carry_their_total_tokens_unshuffled():
    s = WindowBatchSampler(TOKENS, batch_size=2, accumulate=2, shuffle=False)
    batches = list(s)
    assert [[i for i, _ in b] for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # windows: rows 0-3 (9 tokens), rows 4-7 (22 tokens), the short last window rows 8-9 (8 tokens)
    assert [{w for _, w in b} for b in batches] == [{9}, {9}, {22}, {22}, {8}]
    assert len(s) == 5


def test_shuffle_is_deterministic_per_seed_and_epoch():
    a = WindowBatchSampler(TOKENS, batch_size=3, seed=1)
    b = WindowBatchSampler(TOKENS, batch_size=3, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(i for batch in first for i, _ in batch) == list(range(10))


def test_ranks_see_each_row_once_and_share_the_global_window():
    samplers = [WindowBatchSampler(TOKENS, batch_size=2, accumulate=2, num_replicas=3, rank=r, seed=7)
                for r in range(3)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 == len({len(s) for s in samplers})  # ranks stay in step
    seen = Counter(i for batches in per_rank for batch in batches for i, _ in batch)
    assert {i: c for i, c in seen.items() if i != PAD_INDEX} == {i: 1 for i in range(10)}
    assert seen[PAD_INDEX] == 2  # 10 rows over 3 ranks: two padding slots
    for step in range(len(per_rank[0])):
        windows = {w for batches in per_rank for _, w in batches[step]}
        assert len(windows) == 1  # every rank divides by the same global count
    first_window_rows = [i for batches in per_rank for batch in batches[:2] for i, _ in batch if i != PAD_INDEX]
    assert per_rank[0][0][0][1] == sum(TOKENS[i] for i in first_window_rows)


def test_lightning_sets_the_epoch_so_every_epoch_is_reshuffled():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = WindowBatchSampler([1] * 12, batch_size=4, seed=0)
    loader = DataLoader(list(range(12)), batch_sampler=sampler, collate_fn=list)
    first = list(sampler)
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls at every epoch start
    assert sampler.epoch == 1 and list(sampler) != first
