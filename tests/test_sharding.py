"""Each rank's slice of every global batch: pure functions, tested directly."""

from __future__ import annotations

import torch

from bnpipe.train.distributed import World, batch_count, local_batches


def test_ranks_split_every_global_batch_between_them() -> None:
    order = torch.randperm(10)
    per_rank = [list(local_batches(order, 4, World(rank, 3))) for rank in range(3)]
    assert [n for _, n in per_rank[0]] == [4, 4]  # the last batch (2 samples) is fewer than the 3 ranks: dropped
    for b, start in enumerate((0, 4)):
        slices = [per_rank[r][b][0] for r in range(3)]
        assert torch.equal(torch.cat(slices), order[start : start + 4])  # disjoint, in order, all of the batch
        assert max(s.numel() for s in slices) - min(s.numel() for s in slices) <= 1


def test_one_process_gets_whole_batches() -> None:
    order = torch.arange(10)
    batches = list(local_batches(order, 4, World()))
    assert [b.tolist() for b, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [n for _, n in batches] == [4, 4, 2]


def test_batch_count_is_the_number_of_steps_every_rank_takes() -> None:
    # The schedule's length and the kill hook's step numbers come from batch_count: it must agree with
    # the batches each rank really gets, a dropped last batch included.
    for samples, batch, ranks, expected in ((10, 4, 1, 3), (10, 4, 3, 2), (11, 4, 3, 3), (8, 4, 2, 2), (60000, 64, 2, 938)):
        assert batch_count(samples, batch, World(0, ranks)) == expected
        for rank in range(ranks):
            assert len(list(local_batches(torch.arange(samples), batch, World(rank, ranks)))) == expected
