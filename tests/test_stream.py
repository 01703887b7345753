"""data/stream.py: the training stream every stage reads on the paper's path. Each item once an
epoch across ranks x workers, read only by its own shard; a resumed stream goes on with the very
batches the interrupted one would have given, without reading what came before."""

import os
from collections import Counter

import pytest
import torch

from common import UserError
from data.stream import Position, Stream, loader

CPU = torch.device("cpu")


class Ids:
    """make_batches for the tests: a pool in a random order, cut into batches of n (ids and keys)."""

    def __init__(self, n):
        self.n = n

    def __call__(self, items, rng):
        order = rng.permutation(len(items))
        return [{"ids": [str(items[i]["id"]) for i in order[a:a + self.n]], "keys": [items[i]["key"] for i in order[a:a + self.n]]}
                for a in range(0, len(order), self.n)]


def take(batches, n):
    return [next(batches) for _ in range(n)]


@pytest.mark.parametrize("spec", ["shapes:64", "shapes:64,shapes:48"])
def test_every_item_once_an_epoch_across_2_ranks_x_2_workers(spec):
    seen = Counter()
    for rank in range(2):
        stream = Stream(spec, None, Ids(3), pool=4, seed=0, rank=rank, world=2, limit=25)
        for b in take(loader(stream, 2, CPU), 60):      # > 2 epochs of each of this rank's shards
            if b["at"][1] == 0:                         # epoch 0
                seen.update(b["keys"])
    parts = len(spec.split(","))
    assert sorted(seen) == list(range(25 * parts)) and set(seen.values()) == {1}


def test_epochs_differ_and_pools_stay_together():
    stream = Stream("shapes:64", None, Ids(2), pool=4, seed=0, limit=12)
    batches = take(iter(stream), 20)
    epoch = lambda e: [b["ids"] for b in batches if b["at"][1] == e]
    assert sorted(sum(epoch(0), [])) == sorted(sum(epoch(1), [])) and epoch(0) != epoch(1)
    assert all(len(b["ids"]) <= 2 for b in batches)


def test_resume_goes_on_with_the_same_batches(tmp_path):
    whole = take(loader(Stream("shapes:64", None, Ids(3), 4, 0, limit=30), 2, CPU), 25)
    position = Position()
    first = [position.consumed(b) for b in take(loader(Stream("shapes:64", None, Ids(3), 4, 0, limit=30), 2, CPU), 11)]
    state = position.state
    rest = take(loader(Stream("shapes:64", None, Ids(3), 4, 0, state=state, limit=30), 2, CPU), 14)
    assert [b["ids"] for b in first + rest] == [b["ids"] for b in whole]


def test_resume_after_one_batch_of_two_workers():
    """Stopped before every worker gave a batch: the resume still goes on (the saved count of
    shards, not the shards seen, says whether it can)."""
    make = lambda state=None: loader(Stream("shapes:64", None, Ids(3), 4, 0, state=state, limit=30), 2, CPU)
    whole, position = take(make(), 6), Position()
    position.consumed(next(make()))
    assert [b["ids"] for b in take(make(position.state), 5)] == [b["ids"] for b in whole[1:]]


def test_resume_reads_only_the_pool_it_stopped_in(monkeypatch):
    import data
    made = Counter()
    real = data.make_scene

    def counting(seed, size=128):
        made[seed] += 1
        return real(seed, size)
    monkeypatch.setattr("data.make_scene", counting)
    position = Position()
    batches = iter(Stream("shapes:48", None, Ids(2), 6, 0, limit=40))
    for _ in range(9):
        position.consumed(next(batches))
    made.clear()
    next(iter(Stream("shapes:48", None, Ids(2), 6, 0, state=position.state, limit=40)))
    # the pool it stopped in and the next item (which says the pool is over), nothing before
    assert 0 < sum(made.values()) <= 6 + 1 and min(made) >= 9


def test_an_empty_shard_is_one_clear_error():
    with pytest.raises(UserError, match="made no batch"):
        take(loader(Stream("shapes:48", None, Ids(2), 4, 0, limit=1), 2, CPU), 3)
