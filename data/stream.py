"""
Training data as a stream: read from disk as it is needed, never held whole in memory.

On the paper's path a split does not fit in RAM (SA-1B: 11M images; the SFT mixtures: 200k
scenes at their own sizes), so every stage draws its batches from a torch.utils.data
IterableDataset that reads its dataset (data.open_dataset) as it goes:

  sharding   item k of a reader goes to shard (k + epoch) % n, n = ranks x DataLoader workers,
             decided BEFORE the item is read (the readers' take()), so each rank and worker
             decodes only its own images, and every item is seen once an epoch across all of
             them; the shift by the epoch mixes which items meet in a batch from one epoch to
             the next.
  pools      each shard cuts its items into pools of `pool` consecutive items (a rolling buffer;
             the first pool of an epoch is shorter by a random offset) and hands each pool to
             make_batches(items, rng): the stage shuffles, sorts by length (bucketing) and
             cuts the pool into batches there, inside the worker, images decoded and resized.
  mixtures   "A,B" specs: each part has its own shards and pools; pool p of A, then pool p of
             B, ..., so the parts stay interleaved through an epoch.
  position   every batch says where it stands: at = (shard, epoch, pool, batches of the pool
             done). The trainer keeps the last `at` of every shard it consumed (Position);
             a resumed stream skips what came before by counting items, without reading them,
             re-reads only the pool it stopped in, and goes on with the same batches.

An epoch in which a shard makes no batch at all (fewer items than shards, or no usable sample
in its items) yields {"empty": True} so the trainer can say so in one line (loader() does).
"""
from collections import Counter

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from common import UserError, gather, print0


def streamed(cfg):
    """Whether a stage streams its training data: --stream=true, or auto (the default) with any
    --data but the embedded shapes world, which the tiny preset keeps in memory with its caches."""
    if cfg["stream"] not in ("auto", "true", "false"):
        raise UserError(f"--stream takes auto, true or false, got {cfg['stream']!r}")
    return cfg["stream"] == "true" or (cfg["stream"] == "auto" and cfg["data"] != "shapes")


class Exhausted(Exception):
    """Raised by Take past its limit: the reader stops there (the end of the epoch)."""


class Take:
    """A reader's take(): called once per item, in the reader's order, before the item is read;
    True for this shard's items (k + epoch) % n == shard whose local number k // n >= start.
    local: the local number of the last item taken. limit > 0: only items k < limit exist."""

    def __init__(self, shard, n, epoch=0, start=0, limit=0):
        self.shard, self.n, self.epoch, self.start, self.limit = shard, n, epoch, start, limit
        self.k, self.local = -1, None

    def __call__(self):
        self.k += 1
        if self.limit and self.k >= self.limit:
            raise Exhausted
        if (self.k + self.epoch) % self.n != self.shard:
            return False
        self.local = self.k // self.n
        return self.local >= self.start


def _scenes(part, split, max_masks, take):
    """The scenes one part of a spec gives through take, up to its end or take's limit."""
    from data import open_dataset
    it = open_dataset(part, Counter(), split, max_masks, take=take)
    while True:
        try:
            yield next(it)
        except (StopIteration, Exhausted):
            return


def read_split(spec, split, shard=0, n=1, limit=0, max_masks=0):
    """One pass over a split, this shard's items only: (key, scene) pairs, key as in Stream (the
    item's number in its reader, times the parts, plus its part); a mixture's parts in turn."""
    parts = spec.split(",")
    takes = [Take(shard, n, limit=limit) for _ in parts]
    its = {i: _scenes(p, split, max_masks, t) for i, (p, t) in enumerate(zip(parts, takes))}
    while its:
        for i in list(its):
            scene = next(its[i], None)
            if scene is None:
                del its[i]
                continue
            yield takes[i].k * len(parts) + i, scene


class Stream(IterableDataset):
    """Endless batches of a split of --data (see the module docstring). make_batches(items, rng)
    -> list of batches (dicts); items are scene dicts with "key" (an int unique in the split:
    the item's number in its reader, times the parts, plus its part) added. state: a
    Position.state of a previous run. limit: the first `limit` items of each part (0: all)."""

    def __init__(self, spec, split, make_batches, pool, seed, rank=0, world=1, state=None, limit=0, max_masks=0):
        self.parts, self.split, self.make_batches, self.pool = spec.split(","), split, make_batches, pool
        self.seed, self.rank, self.world, self.state = seed, rank, world, dict(state or {})
        self.limit, self.max_masks = limit, max_masks
        from data import open_dataset
        for part in self.parts:         # what cannot be read at all: one line now, not in a worker
            open_dataset(part, Counter(), split, max_masks, take=lambda: False)

    def shard(self):
        """(this worker's shard, the number of shards)."""
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * nw + w, self.world * nw

    def _pools(self, part, shard, n, epoch, start_pool):
        """(pool, items) of one part for this shard and epoch, from pool start_pool on."""
        P, parts = self.pool, len(self.parts)
        off = int(np.random.default_rng([self.seed, epoch, part]).integers(P))
        take = Take(shard, n, epoch, start=max(0, start_pool * P - off), limit=self.limit)
        pool, items = None, []
        for scene in _scenes(self.parts[part], self.split, self.max_masks, take):
            p = (take.local + off) // P
            if p != pool and items:
                yield pool, items
                items = []
            pool = p
            items.append(dict(scene, key=take.k * parts + part))      # take.k: the item's number in its reader
        if items:
            yield pool, items

    def __iter__(self):
        shard, n = self.shard()
        epoch, pool0, part0, done0 = self.state.get(shard, (0, 0, 0, 0, 0))[:4]
        while True:
            # one epoch: the parts' pools merged by pool number, part by part within a pool
            its = [self._pools(i, shard, n, epoch, pool0 + (i < part0)) for i in range(len(self.parts))]
            heads, any_item = [next(it, None) for it in its], False
            while any(h is not None for h in heads):
                p = min(h[0] for h in heads if h is not None)
                for i, h in enumerate(heads):
                    if h is None or h[0] != p:
                        continue
                    rng = np.random.default_rng([self.seed, epoch, shard, p, i])
                    for b, batch in enumerate(self.make_batches(h[1], rng)):
                        any_item = True
                        if b < done0 and (p, i) == (pool0, part0):
                            continue                       # consumed before the resume
                        yield dict(batch, at=(shard, epoch, p, i, b + 1, n))
                    heads[i] = next(its[i], None)
            if not any_item:
                yield {"empty": True}
                return
            epoch, pool0, part0, done0 = epoch + 1, 0, 0, 0


class Position:
    """What the trainer has consumed of a Stream, shard by shard: state = {shard: (epoch, pool,
    part, batches done, the rank's count of batches consumed so far, the number of shards)},
    saved in the checkpoint and given back to Stream(state=...)."""

    def __init__(self, state=None):
        self.state = dict(state or {})
        self.n = max((at[4] for at in self.state.values()), default=0)

    def consumed(self, batch):
        shard, epoch, pool, part, done, shards = batch["at"]
        self.n += 1
        self.state[shard] = (epoch, pool, part, done, self.n, shards)
        return batch

    def gathered(self):
        """Every rank's state merged (a collective under torchrun: call it on every rank)."""
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {k: v for p in gather(self.state, world) for k, v in p.items()}


def loader(stream, workers, device, prefetch=2):
    """The DataLoader over a Stream: `workers` processes read, decode and batch (0: in this
    process), batches pinned for the copy to a GPU; iterating it yields the batches, and
    raises UserError when a shard's epoch is empty. The DataLoader takes its workers' batches in
    turn from worker 0; a resumed run goes on from the worker after the last one consumed, so
    the batches come in the order of the run that was interrupted."""
    dl = torch.utils.data.DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=workers, pin_memory=device.type == "cuda",
                                     prefetch_factor=prefetch if workers else None, persistent_workers=False,
                                     generator=torch.Generator())   # its own: the trainer's random draws stay as they were
    mine = {s: at for s, at in stream.state.items() if s // max(workers, 1) == stream.rank}
    first = (max(mine, key=lambda s: mine[s][4]) + 1) % max(workers, 1) if mine else 0
    try:
        for batch in _rotated(dl, first, max(workers, 1)):
            if "empty" in batch:
                shards = stream.world * max(workers, 1)
                raise UserError(f"--data={','.join(stream.parts)}: a shard of the {stream.split} split made no batch in an "
                                f"epoch ({shards} shards = ranks x workers): it has no usable samples for this stage, or "
                                f"too few items for the shards (use fewer --num_workers)")
            yield batch
    except UserError as e:          # a worker's: torch re-raises it with the worker's traceback in the text
        raise UserError(str(e).strip().splitlines()[-1].removeprefix("common.UserError: ")) from None


def open_stream(cfg, make_batches, pool, saved, device, rank=0, world=1, spec=None, max_masks=0):
    """A stage's training stream: the first n_train items of the train split of --data (or spec),
    read by cfg's num_workers a rank, positioned where a resumed run stopped (saved: the
    checkpoint's Position.state, or None). -> (draw() -> the next batch, counted as consumed;
    its Position)."""
    state = resume_state(saved, world * max(cfg["num_workers"], 1))
    stream = Stream(spec or cfg["data"], "train", make_batches, pool, cfg["seed"], rank, world, state, cfg["n_train"],
                    max_masks)
    position, batches = Position(state), loader(stream, cfg["num_workers"], device)
    return (lambda: position.consumed(next(batches))), position


def _as_is(batch):
    """The batches are made whole in the workers: no conversion (numpy arrays stay arrays)."""
    return batch


def _rotated(batches, first, n):
    """The DataLoader's turns w0, w1, ..., w(n-1), w0, ... -> the same turns from worker `first` on:
    the batches of workers before it wait (at most first of them) until the turn's last one."""
    held = []
    for b in batches:
        w = b["at"][0] % n if "at" in b else n - 1
        if w < first:
            held.append(b)
            continue
        yield b
        if w == n - 1:
            yield from held
            held = []


def resume_state(state, n_shards):
    """A saved Position.state for a run with n_shards shards; another count of shards cannot
    continue the same streams, so it starts them again (with a line saying so)."""
    if state and any(at[5] != n_shards for at in state.values()):
        saved = next(iter(state.values()))[5]
        print0(f"the data stream was saved for {saved} shards (ranks x workers), this run has {n_shards}: "
               "it starts from the beginning of the data")
        return {}
    return state or {}
