"""
Tests for the hand-written residual VQ (quantizer.py): nearest-code search against brute force,
the straight-through estimator, the cumulative commitment loss, one EMA step by hand, dead-code
restart with EMA reset, embed() with missing levels, k-means init and health figures, and DDP
(2 gloo ranks under torchrun) against each other and against one process. CPU only, ~10 s.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # repo root
sys.path.insert(0, os.path.join(ROOT, "tests"))  # ddp_quantizer helpers

from quantizer import ResidualVQ, kmeans

import ddp_quantizer


def make_vq(levels=2, K=16, D=6, seed=0, **kw):
    """A quantizer with random codebooks set explicitly (no k-means), marked initialized."""
    g = torch.Generator().manual_seed(seed)
    vq = ResidualVQ(levels=levels, codebook_size=K, dim=D, **kw)
    vq.codebook.copy_(torch.randn(levels, K, D, generator=g))
    vq.ema_sum.copy_(vq.codebook)
    vq.initialized.fill_(True)
    return vq


def brute_force(codebook, z):
    """Per level: argmin of Euclidean distance to the current residual, by cdist and explicit loops.
    Returns codes (B, L) and the cumulative sums e_1 + ... + e_l as a list of (B, D)."""
    L = codebook.shape[0]
    residual, total = z.clone(), torch.zeros_like(z)
    codes, cums = [], []
    for l in range(L):
        d = torch.cdist(residual.double(), codebook[l].double())  # (B, K)
        c = torch.tensor([min(range(d.shape[1]), key=lambda k: d[i, k].item()) for i in range(d.shape[0])])
        assert torch.equal(c, d.argmin(1))
        e = codebook[l][c]
        total = total + e
        codes.append(c), cums.append(total.clone())
        residual = residual - e
    return torch.stack(codes, 1), cums


# ---------------------------------------------------------------- 1. nearest codes
@pytest.mark.parametrize("levels,K,D,seed", [(2, 16, 6, 0), (3, 32, 4, 1), (1, 8, 12, 2)])
def test_codes_are_brute_force_nearest_neighbours(levels, K, D, seed):
    vq = make_vq(levels, K, D, seed).eval()
    z = torch.randn(50, D, generator=torch.Generator().manual_seed(seed + 100)) * 1.3
    codes_ref, cums = brute_force(vq.codebook, z)
    z_q, codes, _ = vq(z)
    assert codes.shape == (50, levels) and codes.dtype == torch.long
    assert torch.equal(codes, codes_ref)
    assert torch.allclose(z_q, cums[-1], atol=1e-5)                 # forward value = e_1 + ... + e_L
    assert torch.allclose(vq.embed(codes), cums[-1], atol=1e-5)     # embed agrees with forward
    # quantize(): per-level vectors and the residuals each level saw
    c2, vecs, residuals = vq.quantize(z)
    assert torch.equal(c2, codes_ref)
    assert torch.allclose(residuals[0], z)
    for l in range(1, levels):
        assert torch.allclose(residuals[l], z - cums[l - 1], atol=1e-5)
        assert torch.allclose(vecs[l], vq.codebook[l][codes_ref[:, l]])


# ---------------------------------------------------------------- 2. straight-through
def test_straight_through_gradient_is_identity():
    vq = make_vq(2, 16, 6, seed=3).eval()
    z = torch.randn(20, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    w = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    z_q, _, _ = vq(z)
    assert not torch.allclose(z_q, z)  # the forward value really is quantized
    (z_q * w).sum().backward()
    assert torch.allclose(z.grad, w, atol=1e-6)


def test_commitment_gradient_pulls_z_only():
    vq = make_vq(2, 16, 6, seed=3, commitment_weight=0.5).eval()
    z = torch.randn(20, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    _, codes, commit = vq(z)
    commit.backward()
    _, cums = brute_force(vq.codebook, z.detach())
    # d/dz of w * mean_l mean((z - sg(c_l))^2) = w * mean_l 2 (z - c_l) / (B D)
    expected = 0.5 * sum(2 * (z.detach() - c) / z.numel() for c in cums) / len(cums)
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert all(not p.requires_grad for p in vq.buffers())  # codebooks learn by EMA, not gradients


# ---------------------------------------------------------------- 3. commitment loss
@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_commitment_loss_formula(weight):
    vq = make_vq(3, 16, 6, seed=6, commitment_weight=weight).eval()
    z = torch.randn(40, 6, generator=torch.Generator().manual_seed(7))
    _, _, commit = vq(z)
    _, cums = brute_force(vq.codebook, z)
    per_level = [((z.double() - c.double()) ** 2).mean() for c in cums]
    expected = weight * sum(per_level) / len(per_level)
    assert torch.allclose(commit.double(), expected, atol=1e-6)
    assert per_level[-1] < per_level[0]  # sanity: the levels differ, so a level-1-only loss fails


# ---------------------------------------------------------------- 4. EMA step by hand
def test_one_ema_update_matches_hand_computation():
    L, K, D, B, d, eps = 2, 8, 5, 30, 0.9, 0.1
    vq = make_vq(L, K, D, seed=8, decay=d, eps=eps, restarts=False).train()
    g = torch.Generator().manual_seed(9)
    vq.ema_count.copy_(torch.rand(L, K, generator=g) * 3 + 0.2)
    vq.ema_sum.copy_(torch.randn(L, K, D, generator=g))
    N0, m0 = vq.ema_count.double().clone(), vq.ema_sum.double().clone()
    z = torch.randn(B, D, generator=g)
    codes, _ = brute_force(vq.codebook, z)
    _, _, residuals = vq.quantize(z)

    vq(z)

    for l in range(L):
        N = torch.zeros(K, dtype=torch.float64)
        m = torch.zeros(K, D, dtype=torch.float64)
        for k in range(K):
            members = [i for i in range(B) if codes[i, l] == k]
            n_k = float(len(members))
            s_k = residuals[l][members].double().sum(0) if members else torch.zeros(D, dtype=torch.float64)
            N[k] = d * N0[l, k] + (1 - d) * n_k
            m[k] = d * m0[l, k] + (1 - d) * s_k
        n = N.sum()
        smoothed = (N + eps) / (n + K * eps) * n
        e = m / smoothed[:, None]
        assert torch.allclose(vq.ema_count[l].double(), N, atol=1e-5)
        assert torch.allclose(vq.ema_sum[l].double(), m, atol=1e-5)
        assert torch.allclose(vq.codebook[l].double(), e, atol=1e-5)
    assert not torch.allclose(vq.codebook.double(), m0 / N0[..., None], atol=1e-3)  # it moved


def test_eval_mode_does_not_update_codebooks():
    vq = make_vq(2, 8, 5, seed=10).eval()
    before = copy.deepcopy(vq.state_dict())
    vq(torch.randn(30, 5))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- 5. dead-code restart
def dead_setup(B, K=8, D=4, n_live=4, threshold=2.0, seed=11):
    """Codes >= n_live sit far from all data (never chosen) with ema_count below threshold."""
    L = 2
    g = torch.Generator().manual_seed(seed)
    vq = make_vq(L, K, D, seed=seed, dead_threshold=threshold, restarts=True).train()
    vq.codebook[:, n_live:] = 100.0 + torch.randn(L, K - n_live, D, generator=g)
    vq.ema_sum.copy_(vq.codebook * 20.0)
    vq.ema_count.fill_(20.0)
    vq.ema_count[:, n_live:] = 0.5
    vq.ema_sum[:, n_live:] = vq.codebook[:, n_live:] * 0.5
    z = torch.randn(B, D, generator=g)
    return vq, z, torch.arange(K) >= n_live


def test_dead_codes_restart_onto_distinct_batch_residuals_with_ema_reset():
    vq, z, dead = dead_setup(B=32)
    twin = copy.deepcopy(vq)
    twin.restarts = False
    codes, _, residuals = vq.quantize(z)
    assert not codes[:, None, :].eq(torch.nonzero(dead).flatten()[None, :, None]).any()  # never chosen

    torch.manual_seed(0)
    vq(z)
    twin(z)
    t = vq.dead_threshold
    for l in range(vq.levels):
        new = vq.codebook[l, dead]
        # each restarted code is exactly one of this batch's level-l residuals ...
        match = (new[:, None, :] == residuals[l][None]).all(-1)      # (n_dead, B)
        assert match.any(1).all(), f"level {l}: restarted code is not a batch residual"
        # ... and no two restarted codes share one (a duplicate never wins an argmin)
        assert match.float().argmax(1).unique().numel() == int(dead.sum()), f"level {l}: duplicate restarts"
        # EMA state reset: "just born with dead_threshold members at that vector"
        assert torch.all(vq.ema_count[l, dead] == t)
        assert torch.allclose(vq.ema_sum[l, dead], new * t)
        # live codes: exactly the plain EMA step, untouched by the restart
        assert torch.equal(vq.codebook[l, ~dead], twin.codebook[l, ~dead])
        assert torch.equal(vq.ema_count[l, ~dead], twin.ema_count[l, ~dead])
        assert torch.equal(vq.ema_sum[l, ~dead], twin.ema_sum[l, ~dead])
    assert vq.health()["dead"] == [0, 0]
    assert twin.health()["dead"] == [4, 4]


def test_dead_codes_restart_with_jitter_when_batch_is_smaller():
    vq, z, dead = dead_setup(B=3, K=16, n_live=4)  # 12 dead codes, 3 residuals: tiled + noise
    _, _, residuals = vq.quantize(z)
    torch.manual_seed(0)
    vq(z)
    for l in range(vq.levels):
        new = vq.codebook[l, dead]
        dist = torch.cdist(new, residuals[l]).min(1).values
        scale = vq.restart_noise * residuals[l].std() * 10
        assert torch.all(dist < scale)                               # near a batch residual
        assert torch.cdist(new, new).add(torch.eye(len(new)) * 1e9).min() > 0  # but all distinct
        assert torch.all(vq.ema_count[l, dead] == vq.dead_threshold)
        assert torch.allclose(vq.ema_sum[l, dead], new * vq.dead_threshold)


# ---------------------------------------------------------------- 6. embed
def test_embed_missing_levels_and_errors():
    vq = make_vq(2, 16, 6, seed=12)
    cb = vq.codebook
    c1, c2 = 3, 11
    assert torch.allclose(vq.embed([[c1, -1]]), cb[0][c1][None])
    assert torch.allclose(vq.embed(torch.tensor([[c1, c2]])), (cb[0][c1] + cb[1][c2])[None])
    assert torch.equal(vq.embed([[-1, -1]]), torch.zeros(1, 6))
    assert torch.allclose(vq.embed([[-1, c2]]), cb[1][c2][None])
    batch = vq.embed(torch.tensor([[[c1, -1], [c1, c2]], [[-1, -1], [0, 15]]]))  # (2, 2, L)
    assert batch.shape == (2, 2, 6)
    assert torch.allclose(batch[1, 1], cb[0][0] + cb[1][15])
    for bad in ([[16, 0]], [[0, 16]], [[-2, 0]], [[0, -5]]):
        with pytest.raises(ValueError):
            vq.embed(bad)
    with pytest.raises(ValueError):
        vq.embed([[1, 2, 3]])  # wrong number of levels


# ---------------------------------------------------------------- 7. init and health
def test_init_codebooks_kmeans_on_clustered_data():
    torch.manual_seed(13)
    K, D = 16, 8
    centers = torch.randn(K, D) * 5
    z = (centers[:, None, :] + 0.05 * torch.randn(K, 64, D)).reshape(-1, D)
    vq = ResidualVQ(levels=2, codebook_size=K, dim=D)
    assert not bool(vq.initialized)
    vq.init_codebooks(z)
    assert bool(vq.initialized)
    assert torch.equal(vq.ema_sum, vq.codebook) and torch.all(vq.ema_count == 1)
    vq.eval()
    vq.reset_window()
    z_q, _, _ = vq(z)
    h = vq.health()
    assert all(u >= 0.9 for u in h["usage"]), h
    assert all(p > 0.5 * K for p in h["perplexity"]), h
    assert F.mse_loss(z_q, z) < 0.05 * z.var(0).mean()  # codes sit where the data is


def test_forward_initializes_on_first_training_batch():
    torch.manual_seed(14)
    vq = ResidualVQ(levels=2, codebook_size=8, dim=4).train()
    vq(torch.randn(64, 4) * 3)
    assert bool(vq.initialized)
    assert vq.codebook.abs().max() > 0.5  # moved off the tiny random start


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(15)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centers[:, None] + 0.1 * torch.randn(3, 50, 2, generator=g)).reshape(-1, 2)
    found = None
    for s in range(5):  # Lloyd can land in a local minimum from a bad start; one good start is enough
        c = kmeans(x, 3, generator=torch.Generator().manual_seed(s))
        if torch.cdist(centers, c).min(1).values.max() < 0.2:
            found = c
            break
    assert found is not None


def test_health_perplexity_uniform_and_one_hot():
    K = 16
    vq = ResidualVQ(levels=2, codebook_size=K, dim=4)
    h = vq.health(torch.ones(2, K) * 7)
    assert h["usage"] == [1.0, 1.0]
    assert h["perplexity"] == pytest.approx([K, K], rel=1e-5)
    one_hot = torch.zeros(2, K)
    one_hot[0, 3] = 50
    one_hot[1, 0] = 1
    h = vq.health(one_hot)
    assert h["usage"] == pytest.approx([1 / K, 1 / K])
    assert h["perplexity"] == pytest.approx([1.0, 1.0], abs=1e-5)
    half = torch.zeros(2, K)
    half[:, :4] = 1
    assert vq.health(half)["perplexity"] == pytest.approx([4.0, 4.0], rel=1e-5)


# ---------------------------------------------------------------- 8. DDP, 2 gloo ranks
def test_ddp_two_ranks_match_each_other_and_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "ddp_quantizer.py"), str(tmp_path)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    # (a) restarts on: every rank holds the same codebooks and EMA state after every step
    a0, a1 = r0["restarts"], r1["restarts"]
    assert a0["all_equal"] and a1["all_equal"]
    for k in ("codebook", "ema_count", "ema_sum"):
        assert torch.allclose(a0[k], a1[k], atol=1e-5), k
    assert a0["restarted"] >= 8 and a0["restarted"] == a1["restarted"]  # restarts really happened

    # (b) restarts off: 2 ranks x half batch == 1 process x whole batch
    b0, b1 = r0["norestarts"], r1["norestarts"]
    ref = ddp_quantizer.run(ddp_quantizer.make_vq(restarts=False), ddp_quantizer.global_batches())
    assert b0["restarted"] == 0
    for k in ("codebook", "ema_count", "ema_sum"):
        assert torch.allclose(b0[k], b1[k], atol=1e-5), k
        assert torch.allclose(b0[k], ref[k], atol=1e-5), k
    # sanity: a rank training on its half alone would end elsewhere
    half = ddp_quantizer.run(ddp_quantizer.make_vq(restarts=False),
                             [z[: z.shape[0] // 2] for z in ddp_quantizer.global_batches()])
    assert not torch.allclose(half["codebook"], ref["codebook"], atol=1e-3)
