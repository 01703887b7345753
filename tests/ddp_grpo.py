"""
DDP / FSDP2 helper for tests/test_grpo.py, run as
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_grpo.py DIR
DIR/setup.pt holds a batch of rollouts sampled once by the test (prompts, images, completions,
advantages) and the config; DIR/model a tiny saved policy. Every rank loads the same policy and
runs grpo.update on the same global rows (the function shards the micro-batches by rank), first
wrapped in DDP, then sharded with FSDP2; rank 0 saves the full weights after each to
DIR/ddp.pt and DIR/fsdp.pt. The test compares them with one process running train() alone.
Then, in the same launch (one torchrun start-up instead of two), the whole script runs on the
two ranks with the arguments in DIR/setup.pt's "script" (common.run(grpo.main), which ends the group).
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import grpo  # noqa: E402
import vlm  # noqa: E402
from common import run  # noqa: E402


def train(folder, setup, net_of=lambda m, frozen=False: m, rank=0, world=1):
    """Two GRPO steps on the fixed rows, from the saved policy; the reference model (beta > 0)
    is the same start (sharded too under FSDP2). SGD, so the weights compare the gradients themselves."""
    cfg = setup["cfg"]
    model, processor = vlm.load_model(os.path.join(folder, "model"), cfg)
    ref = net_of(vlm.load_model(os.path.join(folder, "model"), cfg)[0].eval().requires_grad_(False), frozen=True)
    net = net_of(model)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=cfg["lr"])
    stats = [grpo.update(net, opt, rows, setup["prompts"], setup["images"], processor, cfg, rank, world, ref)
             for rows in setup["steps"]]
    return net, torch.stack(stats)


def main(folder):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup = torch.load(os.path.join(folder, "setup.pt"), weights_only=False)
    device = torch.device("cpu")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        cfg = dict(setup["cfg"], fsdp=fsdp)
        net, stats = train(folder, dict(setup, cfg=cfg), lambda m, frozen=False: vlm.parallelize(m, cfg, world, device, frozen), rank, world)
        sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"weights": sd, "stats": stats}, os.path.join(folder, f"{name}.pt"))
        dist.barrier()
    sys.argv = ["grpo.py", *setup["script"]]
    run(grpo.main)


if __name__ == "__main__":
    main(sys.argv[1])
