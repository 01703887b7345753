"""
quantizer.ResidualVQ against vector-quantize-pytorch's ResidualVQ, in the paper's configuration:
two levels of 256 codes, dim 256, EMA codebooks with decay 0.99, the plain straight-through
estimator. The level-2 codebook quantizes the residual z - e1 on both sides.

Kept identical: the peer is built in our configuration and holds our codebooks and our EMA state
(copied in); dead-code restarts are off on both sides (a restart draws random batch vectors, which
would make the two runs differ by chance); the same batches of latents go to both, step by step,
so the EMA keeps both codebooks equal; the time is one forward + backward, the median over rounds
that alternate the two sides (the machine's load hits both alike).
"""

import time

import numpy as np
import torch

from bench import peer_missing, sync, table


def peer_rvq(ours):
    """vector-quantize-pytorch's ResidualVQ in our configuration, holding our codebooks.
    Flags (read from its source, v1.32): rotation_trick=False and straight_through=False select
    the plain straight-through estimator x + sg(q - x) (its straight_through flag is the Gumbel
    one); kmeans_init=False; threshold_ema_dead_code=0 turns dead-code restarts off;
    sync_codebook=False, one process. Its EMA (cluster_size, embed_avg, Laplace smoothing with
    eps 1e-5) is the same rule as ours, so the codebooks stay equal step after step."""
    from vector_quantize_pytorch import ResidualVQ as PeerRVQ
    peer = PeerRVQ(dim=ours.dim, num_quantizers=ours.levels, codebook_size=ours.K, decay=ours.decay, eps=ours.eps,
                   kmeans_init=False, rotation_trick=False, straight_through=False, threshold_ema_dead_code=0,
                   commitment_weight=ours.commitment_weight, sync_codebook=False)
    with torch.no_grad():
        for l, layer in enumerate(peer.layers):
            cb = layer._codebook
            cb.embed.copy_(ours.codebook[l][None])
            cb.embed_avg.copy_(ours.ema_sum[l][None])
            cb.cluster_size.copy_(ours.ema_count[l][None])
    return peer.to(ours.codebook.device)


def peer_codebooks(peer):
    return torch.stack([layer._codebook.embed[0] for layer in peer.layers])   # (L, K, D)


def measure(cfg, device):
    """For each batch size of cfg["rvq_batches"]: code agreement in training and at inference, the
    largest codebook difference after training, and the time of one forward + backward a side."""
    skipped = peer_missing("vector_quantize_pytorch", "rvq", ("rvq_speed_ratio", "rvq_codes_agree"))
    if skipped:
        return skipped
    from quantizer import ResidualVQ
    L, K, D = cfg["rvq_levels"], cfg["rvq_codes"], cfg["rvq_dim"]
    g = torch.Generator().manual_seed(cfg["seed"])
    ours = ResidualVQ(levels=L, codebook_size=K, dim=D, decay=0.99, restarts=False).to(device)
    # k-means codebooks (what training starts from) on latents with some structure: a mixture of
    # 64 Gaussians, so codes are neither all tied nor all far apart
    centres = torch.randn(64, D, generator=g)

    def latents(B):
        return (centres[torch.randint(64, (B,), generator=g)] + 0.5 * torch.randn(B, D, generator=g)).to(device)

    ours.init_codebooks(latents(8 * K))
    peer = peer_rvq(ours)

    def step(m, z):
        """One forward + backward: z_q feeds a stand-in downstream loss, plus the commitment loss."""
        z = z.clone().requires_grad_(True)
        z_q, codes, commit = m(z)
        (z_q.square().mean() + commit.sum()).backward()
        return codes

    rows, out = [], {"config": dict(levels=L, codebook_size=K, dim=D, decay=0.99, restarts=False), "batches": {}}
    for B in cfg["rvq_batches"]:
        # (1) agreement in training: same inputs, step by step; the EMA keeps both codebooks equal
        ours.train(), peer.train()
        agree, n = 0, 0
        for _ in range(20):
            z = latents(B)
            a, b = step(ours, z), step(peer, z)
            agree += int((a == b).all(1).sum())
            n += B
        drift = float((ours.codebook - peer_codebooks(peer)).abs().max())
        # (2) agreement at inference, on fresh inputs, with the codebooks both now hold
        ours.eval(), peer.eval()
        with torch.no_grad():
            z = latents(4096)
            a, b = ours(z)[1], peer(z)[1]
        agree_eval = float((a == b).all(1).float().mean())
        # (3) time: rounds alternate ours and theirs (the machine's load hits both alike); each
        # round times rvq_calls forward + backward passes; the median round per side
        ours.train(), peer.train()
        zs = [latents(B) for _ in range(cfg["rvq_calls"])]
        times = {"ours": [], "peer": []}
        for r in range(cfg["rvq_rounds"] + 2):
            for name, m in (("ours", ours), ("peer", peer)):
                sync(device)
                t = time.perf_counter()
                for z in zs:
                    step(m, z)
                sync(device)
                if r >= 2:                         # two warm-up rounds
                    times[name].append((time.perf_counter() - t) / len(zs))
        t_ours, t_peer = float(np.median(times["ours"])), float(np.median(times["peer"]))
        out["batches"][B] = dict(ms_ours=t_ours * 1e3, ms_peer=t_peer * 1e3, speed_ratio=t_peer / t_ours,
                                 codes_agree_train=agree / n, codes_agree_eval=agree_eval, codebook_max_diff=drift)
        rows.append([B, t_ours * 1e3, t_peer * 1e3, t_peer / t_ours, agree / n, agree_eval, f"{drift:.1e}"])
    print(table(["masks a batch", "ours ms", "vector-quantize-pytorch ms", "speed ratio (>1: ours faster)",
                 "codes agree (train)", "codes agree (eval)", "max codebook diff"], rows))
    # headline figures: the paper's per-GPU batch (the largest measured) and the worst agreement
    big = out["batches"][max(cfg["rvq_batches"])]
    agree_all = min(min(v["codes_agree_train"], v["codes_agree_eval"]) for v in out["batches"].values())
    return {"rvq_speed_ratio": big["speed_ratio"], "rvq_codes_agree": agree_all, "rvq": out}
