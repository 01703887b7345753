"""
DDP helper for tests/test_quantizer.py, run as
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_quantizer.py OUTDIR
Every rank builds the same fixed global batches from a seed and trains on its own half of each.
Two runs: restarts on and restarts off, both from the same explicitly set codebooks (no k-means).
Each rank saves its final quantizer state to OUTDIR/rank{r}.pt; the test compares them with each
other and with a single-process run on the whole global batches.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from quantizer import ResidualVQ

LEVELS, K, D, B, STEPS = 2, 16, 8, 64, 6   # B is the global batch; each rank gets B // world


def make_vq(restarts):
    """Quantizer with the same seeded start on every rank (and in the single-process reference)."""
    g = torch.Generator().manual_seed(1234)
    vq = ResidualVQ(levels=LEVELS, codebook_size=K, dim=D, restarts=restarts)
    vq.codebook.copy_(torch.randn(LEVELS, K, D, generator=g))
    vq.codebook[:, -4:] += 50.0  # 4 codes per level far from all data: dead after step 1
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.fill_(1.0)
    vq.initialized.fill_(True)
    return vq.train()


def global_batches():
    g = torch.Generator().manual_seed(99)
    return [torch.randn(B, D, generator=g) * 1.5 for _ in range(STEPS)]


def run(vq, batches, rank=0, world=1):
    restarted = []  # dead codes found by each restart_dead_codes call (so the test knows they ran)
    original = vq.restart_dead_codes

    def counting_restart(residuals):
        restarted.append(int((vq.ema_count < vq.dead_threshold).sum()))
        original(residuals)

    vq.restart_dead_codes = counting_restart
    for z in batches:
        n = z.shape[0] // world
        vq(z[rank * n:(rank + 1) * n])
    state = {k: getattr(vq, k).clone() for k in ("codebook", "ema_count", "ema_sum")}
    state["restarted"] = sum(restarted)
    return state


def main(outdir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # ranks draw different restart candidates: the broadcast must fix that
    out = {}
    for restarts in (True, False):
        state = run(make_vq(restarts), global_batches(), rank, world)
        # all_gather the codebooks too, so a mismatch is also visible from inside the job
        gathered = [torch.empty_like(state["codebook"]) for _ in range(world)]
        dist.all_gather(gathered, state["codebook"])
        state["all_equal"] = all(torch.equal(gathered[0], t) for t in gathered)
        out["restarts" if restarts else "norestarts"] = state
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
