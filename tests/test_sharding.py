"""Each rank's slice of every global batch: pure functions, tested directly."""

from __future__ import annotations

import torch

from bnpipe.train.distributed import World, local_batches


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
