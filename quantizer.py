"""
The residual vector quantizer of SAMTok, written out by hand as a lesson.

SAMTok squeezes a whole region mask into one 256-d vector z and then writes that vector
with two "words": a level-1 code c1 = nearest(z) picked from a codebook of 256 entries, and a
level-2 code c2 = nearest(z - e1) that quantizes what level 1 missed (the residual). The
decoder only ever sees e1 + e2, so 256 x 256 = 65,536 masks can be told apart per image.

The pieces, in the paper's words (PAPER.md section 1):
- nearest code by squared L2 distance, one codebook per level;
- the straight-through estimator z_q = z + sg(e1 + e2 - z): the forward pass uses the codes,
  the backward pass copies the gradient of z_q onto z as if quantization were the identity;
- the cumulative commitment loss, mean over levels l of ||z - sg(e1 + ... + e_l)||^2, which
  pulls the encoder output towards what the codebooks can say;
- codebooks learned by an exponential moving average of the vectors assigned to each code
  (decay 0.99, Laplace-smoothed cluster sizes), not by gradient descent;
- dead-code restart: a code whose EMA cluster size falls below a threshold is moved onto a
  vector of the current batch, *and its EMA state is reset with it* (otherwise the next EMA
  step pulls it straight back to where it died);
- data-driven initialisation (k-means on a first batch of latents);
- DDP: cluster statistics are all-reduced and restarts broadcast from rank 0, so every rank
  holds the same codebooks after every step;
- code -1 means "level missing": embed() sums only the valid levels (level-1-only decode).

Usage (this file is a library; tokenizer.py trains it):
    vq = ResidualVQ(levels=2, codebook_size=256, dim=256)
    vq.init_codebooks(z_sample)            # (N, 256), optional k-means start
    z_q, codes, commit = vq(z)             # (B, 256), (B, 2), scalar
    vq.embed(torch.tensor([[3, -1]]))      # level-1-only vector
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist


def _ddp():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def squared_distances(x, codebook):
    """(N, D), (K, D) -> (N, K) squared L2 distances, ||x||^2 - 2 x.c + ||c||^2, in fp32."""
    x, codebook = x.float(), codebook.float()
    return x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.t() + codebook.pow(2).sum(1)[None]


def kmeans(x, k, iters=20, generator=None):
    """Plain Lloyd k-means: (N, D) -> (k, D). Clusters that empty out are re-seeded from points."""
    n = x.shape[0]
    # start from k distinct points when we have them (sampled with replacement otherwise)
    idx = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centers = x[idx].clone()
    for _ in range(iters):
        assign = squared_distances(x, centers).argmin(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters on random points so every code gets used
            centers[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centers


class ResidualVQ(nn.Module):
    def __init__(self, levels=2, codebook_size=256, dim=256, decay=0.99, eps=1e-5,
                 commitment_weight=1.0, dead_threshold=1.0, restart_noise=0.01, restarts=True):
        super().__init__()
        self.levels, self.K, self.dim = levels, codebook_size, dim
        self.decay, self.eps = decay, eps
        self.commitment_weight = commitment_weight
        self.dead_threshold = dead_threshold  # EMA cluster size under which a code is "dead"
        self.restart_noise = restart_noise    # relative noise when a small batch is tiled
        self.restarts = restarts
        # All state lives in buffers: it is saved in checkpoints and moved with .to(device),
        # but the optimizer never sees it (EMA, not gradients, learns the codebooks).
        self.register_buffer("codebook", torch.randn(levels, codebook_size, dim) * 0.02)  # (L, K, D)
        self.register_buffer("ema_count", torch.ones(levels, codebook_size))                # (L, K)
        self.register_buffer("ema_sum", self.codebook.clone())                              # (L, K, D)
        self.register_buffer("initialized", torch.tensor(False))
        # Usage counts since the last reset_window(): the "% codes active" health figure.
        self.register_buffer("window_counts", torch.zeros(levels, codebook_size), persistent=False)

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_codebooks(self, z, iters=20):
        """Data-driven start: k-means on z for level 1, then on the residual z - e1 for level 2.
        Random codebooks put most codes far from every latent; they never win an argmin and are
        dead from step one. k-means puts every code where latents actually are."""
        residual = z.detach().float()
        for l in range(self.levels):
            centers = kmeans(residual, self.K, iters)
            self.codebook[l] = centers
            residual = residual - centers[squared_distances(residual, centers).argmin(1)]
        self._broadcast(self.codebook)  # rank 0's k-means wins: one codebook for all ranks
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    # ---------------------------------------------------------------- quantization
    @torch.no_grad()
    def quantize(self, z):
        """(B, D) -> codes (B, L), per-level code vectors (L, B, D), residuals (L, B, D).
        Level l quantizes r_l = z - (e_1 + ... + e_{l-1}): each level explains what the previous
        ones could not."""
        residual = z.detach().float()
        codes, vecs, residuals = [], [], []
        for l in range(self.levels):
            c = squared_distances(residual, self.codebook[l]).argmin(1)  # (B,)
            e = self.codebook[l][c]                                        # (B, D)
            codes.append(c), vecs.append(e), residuals.append(residual)
            residual = residual - e
        return torch.stack(codes, 1), torch.stack(vecs), torch.stack(residuals)

    def forward(self, z):
        """z (B, D) -> z_q (B, D) with straight-through gradients, codes (B, L), commitment loss."""
        if self.training and not bool(self.initialized):
            self.init_codebooks(z)  # fallback: initialise on the first batch we are given
        codes, vecs, residuals = self.quantize(z)
        cum = vecs.cumsum(0).to(z.dtype)                # (L, B, D): e1, e1 + e2, ...
        # cumulative commitment loss: mean over levels of ||z - sg(e_1 + ... + e_l)||^2 (the
        # squared norm averaged over the D dims and the batch, like F.mse_loss)
        commit = torch.stack([F.mse_loss(z, cum[l]) for l in range(self.levels)]).mean()
        # straight-through estimator: value of the quantized vector, gradient of the identity
        z_q = z + (cum[-1] - z).detach()
        with torch.no_grad():
            ids = (codes + torch.arange(self.levels, device=codes.device) * self.K).reshape(-1)
            self.window_counts += torch.bincount(ids, minlength=self.levels * self.K).view(self.levels, self.K)
        if self.training:
            self.ema_update(codes, residuals)
        return z_q, codes, self.commitment_weight * commit

    @torch.no_grad()
    def ema_update(self, codes, residuals):
        """One EMA step per level, then dead-code restart.
        N_k <- d N_k + (1-d) n_k        (cluster size: how many vectors chose code k)
        m_k <- d m_k + (1-d) sum_i r_i  (sum of the residuals that chose code k)
        e_k  = m_k / N~_k,  N~_k = (N_k + eps) / (n + K eps) * n   (Laplace smoothing keeps
        N~_k > 0, so a code nobody chose does not divide by zero)."""
        L, K = self.levels, self.K
        # Scatter-add over ids offset per level (level l's code k is row l*K + k): the same sums
        # as a one-hot matmul, without building and multiplying a (L, B, K) one-hot (~40% of a
        # quantizer step at B = 1024 masks). On CUDA the atomics make the last bits vary.
        ids = (codes + torch.arange(L, device=codes.device) * K).t().reshape(-1)   # (L*B,)
        counts = torch.bincount(ids, minlength=L * K).float().view(L, K)          # (L, K)
        sums = residuals.new_zeros(L * K, residuals.shape[-1]).index_add_(0, ids, residuals.reshape(-1, residuals.shape[-1]))
        sums = sums.view(L, K, -1)                                                 # (L, K, D)
        if _ddp():  # global cluster statistics: one all-reduce carries both
            flat = torch.cat([counts[..., None], sums], -1)
            dist.all_reduce(flat)
            counts, sums = flat[..., 0], flat[..., 1:]
        d = self.decay
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.ema_count.sum(1, keepdim=True)                      # (L, 1)
        smoothed = (self.ema_count + self.eps) / (n + K * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[..., None])
        if self.restarts:
            self.restart_dead_codes(residuals)

    @torch.no_grad()
    def restart_dead_codes(self, residuals):
        """Move each dead code onto a random residual of this batch and reset its EMA state to
        "just born with dead_threshold members at that vector". ema_count is identical on all
        ranks (all-reduced), so every rank agrees on which codes are dead; rank 0 picks the
        replacements and broadcasts them."""
        for l in range(self.levels):
            dead = self.ema_count[l] < self.dead_threshold              # (K,)
            n_dead = int(dead.sum())
            if n_dead == 0:
                continue
            r = residuals[l]                                            # (B, D)
            if n_dead <= r.shape[0]:  # distinct vectors: two codes on one vector, one never wins
                new = r[torch.randperm(r.shape[0], device=r.device)[:n_dead]]
            else:  # batch smaller than the dead set: tiled copies, so jitter
                new = r[torch.randint(r.shape[0], (n_dead,), device=r.device)]
                new = new + self.restart_noise * r.std() * torch.randn_like(new)
            self._broadcast(new)
            self.codebook[l, dead] = new
            self.ema_sum[l, dead] = new * self.dead_threshold
            self.ema_count[l, dead] = self.dead_threshold

    def _broadcast(self, t):
        if _ddp():
            dist.broadcast(t, src=0)

    # ---------------------------------------------------------------- decoding and health
    def embed(self, codes):
        """codes (..., L) with -1 for "level missing" -> (..., D): the sum of the valid levels."""
        codes = torch.as_tensor(codes, device=self.codebook.device).long()
        if codes.shape[-1] != self.levels:
            raise ValueError(f"codes must have {self.levels} levels in the last dim, got shape {tuple(codes.shape)}")
        if ((codes < -1) | (codes >= self.K)).any():
            raise ValueError(f"codes must be in [-1, {self.K - 1}], got {codes.min().item()}..{codes.max().item()}")
        out = torch.zeros(*codes.shape[:-1], self.dim, device=self.codebook.device)
        for l in range(self.levels):
            c = codes[..., l]
            out = out + torch.where((c >= 0)[..., None], self.codebook[l][c.clamp(min=0)], 0.0)
        return out

    @torch.no_grad()
    def health(self, counts=None):
        """Per level: usage (fraction of codes chosen at least once in the window), perplexity
        exp(H(p)) of the code distribution (K if uniform, 1 if collapsed), and dead codes."""
        counts = self.window_counts if counts is None else counts
        p = counts / counts.sum(1, keepdim=True).clamp(min=1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(1)
        return {"usage": (counts > 0).float().mean(1).tolist(),
                "perplexity": entropy.exp().tolist(),
                "dead": (self.ema_count < self.dead_threshold).sum(1).tolist()}

    def reset_window(self):
        self.window_counts.zero_()
