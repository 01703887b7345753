"""
Benchmarks, like nanoGPT's bench.py: measurements that explain the figures the stages report, and
the same work done side by side with the libraries a reader already knows, on the same inputs,
as ratios. Each section runs on its own (--only=rvq,encodings) and merges its figures into
out/bench.json; every section prints a markdown table.

Sections (--only takes a comma list of these names):
  resolution  ideal-logit reference of SAM2's 4x-grid decoder on the synthetic world (no model)
  rvq         quantizer.ResidualVQ against vector-quantize-pytorch's ResidualVQ at 2 x 256, dim 256,
              EMA 0.99, plain straight-through: forward + backward time, and code agreement
  encodings   mask encodings at a token budget on the test split: SAMTok's 2 codes (4 tokens), a
              box (4 tokens), polygons of k vertices (2k tokens), RLE: tokens per mask vs mIoU
  sft         sft.py's training tokens/s and loss after N steps against TRL's SFTTrainer, same
              tiny VLM, data, batches, steps, one process
  grpo        grpo.py's completions/s and step time against TRL's GRPOTrainer
  gpu         (--gpu_check) one command, <= 5 minutes on one H200, random-init models of the real
              sizes: tokenizer training at SAM2.1-L / 1024 px, SFT at Qwen2.5-VL-3B in bf16 (tokens/s,
              MFU), GRPO generation (completions/s). --dry_run runs the same code at tiny sizes on CPU.

    python bench.py                                # resolution, rvq, encodings, sft, grpo on CPU
    python bench.py --only=rvq,encodings           # some sections
    python bench.py --device=cuda                  # the timed sections on a GPU
    python bench.py --gpu_check                    # the real-size GPU check (issue 5), < 5 minutes
    python bench.py --dry_run                      # the GPU check's code paths at tiny sizes, CPU
    python bench.py --only=resolution --image_size=256 --n=200

The peers are optional, never needed by the stages or the tests; a section whose peer is missing
says so and records null:
    pip install vector-quantize-pytorch==1.32.0 trl==1.16.0
The encodings and sft sections read the Stage-1 tokenizer (out/tokenizer/ckpt.pt: python tokenizer.py).
Timings are wall clock on whatever else shares the machine: run it alone for figures to quote.
"""

import heapq
import json
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, configure, die, lr_at, write_json

PEER_PIP = "pip install vector-quantize-pytorch==1.32.0 trl==1.16.0"
SECTIONS = ("resolution", "rvq", "encodings", "sft", "grpo", "gpu")

DEFAULTS = dict(
    only="resolution,rvq,encodings,sft,grpo",   # comma list of SECTIONS
    device="auto",              # auto | cpu | cuda (timed sections)
    out="out/bench.json",
    seed=0,
    # resolution: ideal-logit reference
    image_size=128, n=100, grids=(32, 48, 64),
    # rvq: the paper's quantizer shape; batches of masks a step (tiny preset ~56, paper 1024 a GPU)
    rvq_levels=2, rvq_codes=256, rvq_dim=256, rvq_batches=(64, 1024), rvq_rounds=15, rvq_calls=10,
    # encodings
    tokenizer_ckpt="out/tokenizer/ckpt.pt",
    enc_scenes=500,             # test scenes (500 = the tokenizer's test split: 1,774 masks)
    poly_vertices=(4, 8, 16, 32),
    bins=256,                   # coordinate bins of the box and polygon tokens
    # sft: sft.py (its own process) against TRL's SFTTrainer (this process)
    sft_steps=30, sft_warmup=3,  # steps timed after sft_warmup untimed ones, on both sides
    sft_repeats=3,              # runs a side, alternating (ABBA...): the median counts
    sft_args="--n_train=200 --vision_pretrain_steps=0",   # extra sft.py options, the same for both sides (the whole model trains)
    sft_out="out/bench/sft",
    # grpo: grpo.py (its own process, from the Stage-2 model in out/sft) against TRL's GRPOTrainer
    grpo_steps=6, grpo_warmup=1, grpo_args="--n_train=100", grpo_out="out/bench/grpo",
    # gpu check (issue 5): real sizes, random init, one GPU
    gpu_check=False, dry_run=False,
    gpu_steps=8, gpu_warmup=3,
    gpu_tok_images=16, gpu_tok_masks=8,         # SAM2.1-L tokenizer: 16 images x 8 masks a step
    gpu_sft_batch=4, gpu_sft_image=448,          # Qwen2.5-VL-3B: conversations a step (~80 GB), px
    gpu_gen_prompts=8, gpu_gen_group=16, gpu_gen_tokens=64,   # GRPO: prompts x G completions
    peak_tflops=989.0,          # H100 / H200 dense bf16 peak, for the MFU
)
PRESETS = {"tiny": {}, "paper": {}}


# ============================================================================ helpers
def pick_device(pref):
    if pref == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but torch sees no GPU")
    return torch.device("cuda" if pref in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def table(header, rows):
    """A markdown table as a string; floats get 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def last_line(text):
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "(no message)"


def try_import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


# ============================================================================ resolution
def signed_distance(mask):
    """(H, W) bool -> signed distance to the boundary, positive inside: for a pixel inside, the
    distance to the nearest pixel outside; outside, minus the distance to the nearest pixel
    inside (scipy's edt(m) - edt(~m), so the zero crossing lies midway between the two).
    Brute force over boundary pixels in chunks: exact and numpy only."""
    def dist_to(targets):
        ty, tx = np.nonzero(targets)
        t = np.stack([ty, tx], 1).astype(np.float32)
        d = np.full(pts.shape[0], np.inf, np.float32)
        for i in range(0, len(t), 512):
            d = np.minimum(d, ((pts[:, None, :] - t[None, i:i + 512]) ** 2).sum(-1).min(1))
        return np.sqrt(d).reshape(mask.shape)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)
    pad = np.pad(mask, 1, mode="edge")
    grown = pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:] | mask
    shrunk = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:] & mask
    # the nearest outside pixel of an inside pixel is always one that touches the mask
    return np.where(mask, dist_to(grown & ~mask), -dist_to(mask & ~shrunk))


def bench_resolution(cfg, device):
    """The resolution reference of SAM2's mask decoder. The decoder paints low-res logits at 4x the
    stride-16 feature grid (256x256 at 1024 px; 32x32 at the tiny preset's 128 px), and the mask
    is those logits upsampled bilinearly and thresholded. No decoder draws a boundary much finer
    than that grid allows; the reference is what *ideal smooth* logits give: the mask's signed
    distance field averaged over each logit cell, upsampled the same way. (A learned decoder can
    beat it a little on tiny masks by sharpening its logits: a reference, not a hard bound.) No
    model: a property of the data and the resolution alone."""
    from data import iter_scenes
    from tokenizer import AREA_BUCKETS, iou
    S = cfg["image_size"]
    masks = np.concatenate([s["masks"] for _, s in iter_scenes("val", cfg["n"], size=S)])
    area = masks.reshape(len(masks), -1).mean(1)
    sdf = torch.tensor(np.stack([signed_distance(m) for m in masks]))[:, None]
    results, rows = {}, []
    for g in cfg["grids"]:
        lo = F.interpolate(sdf, size=(g, g), mode="area")
        up = F.interpolate(lo, size=(S, S), mode="bilinear", align_corners=False)[:, 0] > 0
        ious = iou(up.numpy(), masks)
        buckets = {name: float(ious[(area >= a) & (area < b)].mean()) for a, b, name in AREA_BUCKETS
                   if ((area >= a) & (area < b)).any()}
        results[g] = {"miou": float(ious.mean()), "by_area": buckets}
        rows.append([f"{g}x{g}", float(ious.mean()), *buckets.values()])
    print(table(["logit grid", "ideal-logit mIoU", *buckets], rows))
    print(f"{len(masks)} val masks at {S} px")
    return {"resolution_reference": {"image_size": S, "masks": len(masks), "grids": results}}


# ============================================================================ rvq
def peer_rvq(ours):
    """vector-quantize-pytorch's ResidualVQ in our configuration, holding our codebooks.
    Flags (read from its source, v1.32): rotation_trick=False and straight_through=False select
    the plain straight-through estimator x + sg(q - x) (its straight_through flag is the Gumbel
    one); kmeans_init=False; threshold_ema_dead_code=0 turns dead-code restarts off (both sides:
    a restart draws random batch vectors, which would make the two runs differ by chance);
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


def bench_rvq(cfg, device):
    if try_import("vector_quantize_pytorch") is None:
        print(f"rvq: vector-quantize-pytorch is not installed ({PEER_PIP}); skipped")
        return {"rvq_speed_ratio": None, "rvq_codes_agree": None, "rvq": {"skipped": "vector-quantize-pytorch missing"}}
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


# ============================================================================ encodings
# Masks as other formats at a token budget. Pixel (r, c) is the unit square [c, c+1] x [r, r+1];
# polygon vertices are points on that grid of pixel corners, a pixel is inside a polygon when
# its centre (c + 0.5, r + 0.5) is.
def trace_loops(mask):
    """(H, W) bool -> the closed boundary loops of the mask along pixel edges, as (n, 2) float
    arrays of (x, y) corners without collinear points, and their signed areas (shoelace, y
    down): outer boundaries < 0, holes > 0. Every boundary edge is oriented with the mask on its
    left; where two pixels touch only at a corner the walk turns towards the current pixel, so
    the pixels are 4-connected and every loop is simple."""
    m = np.pad(np.asarray(mask, bool), 1)
    inside = m[1:-1, 1:-1]
    r, c = np.nonzero(inside & ~m[:-2, 1:-1])                   # background above: top edge, leftwards
    edges = [np.stack([c + 1, r, c, r], 1)]
    r, c = np.nonzero(inside & ~m[2:, 1:-1])                    # below: bottom edge, rightwards
    edges.append(np.stack([c, r + 1, c + 1, r + 1], 1))
    r, c = np.nonzero(inside & ~m[1:-1, :-2])                   # left: left edge, downwards
    edges.append(np.stack([c, r, c, r + 1], 1))
    r, c = np.nonzero(inside & ~m[1:-1, 2:])                    # right: right edge, upwards
    edges.append(np.stack([c + 1, r + 1, c + 1, r], 1))
    out = {}                                                    # corner -> its outgoing edges' ends
    for x0, y0, x1, y1 in np.concatenate(edges).tolist():
        out.setdefault((x0, y0), []).append((x1, y1))

    def turn(cur, d, options):
        """The outgoing edge at cur for incoming direction d: the only one, or at a corner two
        pixels share diagonally the turn towards the mask ((dy, -dx): hug the current pixel)."""
        if len(options) == 1:
            return options[0]
        want = (cur[0] + d[1], cur[1] - d[0])
        return want if want in options else options[0]

    loops = []
    while out:
        # every corner pairs each incoming edge with one outgoing edge, so walking from any edge
        # comes back to it: that closes the loop
        s = next(iter(out))
        t0 = out[s].pop(0)
        pts, cur, nxt = [s], s, t0
        while True:
            d, cur = (nxt[0] - cur[0], nxt[1] - cur[1]), nxt
            options = out.get(cur, []) + ([t0] if cur == s else [])
            nxt = turn(cur, d, options)
            if cur == s and nxt == t0:
                break
            out[cur].remove(nxt)
            pts.append(cur)
        for c in set(pts):
            if c in out and not out[c]:
                del out[c]
        p = np.array(pts, np.float64)
        # drop points where the direction does not change (staircases keep their corners)
        prev, nxt_ = np.roll(p, 1, 0), np.roll(p, -1, 0)
        cross = (p[:, 0] - prev[:, 0]) * (nxt_[:, 1] - p[:, 1]) - (p[:, 1] - prev[:, 1]) * (nxt_[:, 0] - p[:, 0])
        p = p[cross != 0]
        loops.append(p)
    return [(p, signed_area(p)) for p in loops]


def signed_area(p):
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def simplify(loops, k):
    """Visvalingam-Whyatt over all loops at once, down to at most k vertices in total: repeatedly
    drop the vertex whose triangle with its two neighbours has the least area (the least change
    of the shape). A loop of three vertices is its own triangle: dropping a vertex there drops
    the loop, at the cost of its area, so the budget goes where the area is."""
    loops = [np.asarray(p, np.float64) for p in loops if len(p) >= 3]
    pts = np.concatenate(loops) if loops else np.zeros((0, 2))
    owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(loops)]) if loops else np.zeros(0, int)
    starts = np.cumsum([0] + [len(p) for p in loops])
    prev = np.concatenate([np.roll(np.arange(a, b), 1) for a, b in zip(starts[:-1], starts[1:])]) if loops else []
    nxt = np.concatenate([np.roll(np.arange(a, b), -1) for a, b in zip(starts[:-1], starts[1:])]) if loops else []
    prev, nxt = list(map(int, prev)), list(map(int, nxt))
    size = [len(p) for p in loops]
    alive = [True] * len(pts)
    version = [0] * len(pts)

    def cost(i):
        a, b, c = pts[prev[i]], pts[i], pts[nxt[i]]
        return 0.5 * abs((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    heap = [(cost(i), i, 0) for i in range(len(pts))]
    heapq.heapify(heap)
    total = len(pts)
    while total > k and heap:
        _, i, v = heapq.heappop(heap)
        if not alive[i] or v != version[i]:
            continue
        o = owner[i]
        if size[o] == 3:     # the loop itself goes
            j = i
            for _ in range(3):
                alive[j] = False
                j = nxt[j]
            size[o], total = 0, total - 3
            continue
        p, n = prev[i], nxt[i]
        nxt[p], prev[n] = n, p
        alive[i] = False
        size[o] -= 1
        total -= 1
        for j in (p, n):
            version[j] += 1
            heapq.heappush(heap, (cost(j), j, version[j]))
    out = []
    for o, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        if size[o] == 0:
            continue
        first = next(i for i in range(a, b) if alive[i])
        ring, j = [first], nxt[first]
        while j != first:
            ring.append(j)
            j = nxt[j]
        out.append(pts[ring])
    return out


def rasterize(loops, H, W):
    """Polygons -> (H, W) bool: a pixel is set when its centre is inside an odd number of them
    (the even-odd rule over all loops, so a hole's loop cuts it out of the outer one)."""
    py = np.arange(H)[:, None] + 0.5
    px = np.arange(W)[None, :] + 0.5
    out = np.zeros((H, W), bool)
    for p in loops:
        for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, 0)):
            if y0 == y1:
                continue
            crosses = (y0 > py) != (y1 > py)                              # (H, 1): edge spans the row
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)                 # (H, 1): where it crosses
            out ^= crosses & (px < x_at)                                  # a crossing right of the pixel
    return out


def quantize_xy(p, H, W, bins):
    """Coordinates in [0, W] x [0, H] -> integer bins 0..bins-1 (one token each) -> coordinates."""
    scale = np.array([W, H], np.float64)
    q = np.clip(np.round(np.asarray(p) / scale * (bins - 1)), 0, bins - 1)
    return q * scale / (bins - 1)


def polygon_encode(mask, k, bins=256):
    """A mask as polygons of at most k vertices in total, coordinates in `bins` bins: every
    boundary loop (outer outlines and holes, read with the even-odd rule), simplified together,
    so the vertices go where the area is. -> list of (n, 2) quantized vertex arrays; 2 tokens a
    vertex (loop separators not counted: a generous count for the polygon side)."""
    H, W = mask.shape
    return [quantize_xy(p, H, W, bins) for p in simplify([p for p, _ in trace_loops(mask)], k)]


def box_encode(mask, bins=256):
    """The tight box (x1, y1, x2, y2 exclusive), 4 coordinate tokens of `bins` bins."""
    from data.jsonl import boxes_from_masks
    H, W = mask.shape
    b = boxes_from_masks(mask[None])[0].reshape(2, 2)
    return quantize_xy(b, H, W, bins).ravel()


def box_decode(box, H, W):
    x1, y1, x2, y2 = box
    cy, cx = np.arange(H)[:, None] + 0.5, np.arange(W)[None, :] + 0.5
    return (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)


def rle_tokens(mask):
    """Run lengths of COCO's uncompressed RLE (data.jsonl's format), one token per run."""
    from data.jsonl import rle_encode
    return len(rle_encode(mask)["counts"])


def bench_encodings(cfg, device):
    """Tokens a mask against mIoU. SAMTok's count includes its two delimiters; the box's and the
    polygons' count only their coordinates (no delimiters, no loop separators): generous to them."""
    from data import iter_scenes
    from data.jsonl import rle_decode, rle_encode
    from tokenizer import AREA_BUCKETS, iou, load_tokenizer
    tok = load_tokenizer(cfg["tokenizer_ckpt"], device)
    S = tok.cfg["image_size"]
    names = ["SAMTok, 2 codes", "SAMTok, level 1 only", "box"] + [f"polygon, {k} vertices" for k in cfg["poly_vertices"]] + ["RLE"]
    ious = {n: [] for n in names}
    tokens = {n: [] for n in names}
    areas = []
    t_codec = 0.0
    for _, s in iter_scenes("test", cfg["enc_scenes"], size=S):
        image, masks = s["image"], s["masks"]
        H, W = masks.shape[1:]
        sync(device)
        t = time.perf_counter()
        codes = tok.encode(image, masks)
        rebuilt = tok.decode(image, codes)
        sync(device)
        t_codec += time.perf_counter() - t
        level1 = codes.clone()
        level1[:, 1] = -1
        ious["SAMTok, 2 codes"].append(iou(rebuilt, masks))
        ious["SAMTok, level 1 only"].append(iou(tok.decode(image, level1), masks))
        tokens["SAMTok, 2 codes"] += [4] * len(masks)        # <|mt_start|> c1 c2 <|mt_end|>
        tokens["SAMTok, level 1 only"] += [3] * len(masks)
        areas.append(masks.reshape(len(masks), -1).mean(1))
        for m in masks:
            ious["box"].append(iou(box_decode(box_encode(m, cfg["bins"]), H, W)[None], m[None]))
            tokens["box"].append(4)
            for k in cfg["poly_vertices"]:
                poly = polygon_encode(m, k, cfg["bins"])
                ious[f"polygon, {k} vertices"].append(iou(rasterize(poly, H, W)[None], m[None]))
                tokens[f"polygon, {k} vertices"].append(2 * sum(len(p) for p in poly))
            ious["RLE"].append(iou(rle_decode(rle_encode(m))[None], m[None]))
            tokens["RLE"].append(rle_tokens(m))
    area = np.concatenate(areas)
    rows, result = [], {}
    for n in names:
        v = np.concatenate(ious[n])
        by_area = {b: float(v[(area >= lo) & (area < hi)].mean()) for lo, hi, b in AREA_BUCKETS
                   if ((area >= lo) & (area < hi)).any()}
        result[n] = dict(tokens=float(np.mean(tokens[n])), tokens_max=int(np.max(tokens[n])), miou=float(v.mean()),
                         by_area=by_area)
        rows.append([n, float(np.mean(tokens[n])), int(np.max(tokens[n])), float(v.mean()), *by_area.values()])
    print(table(["encoding", "tokens a mask (mean)", "max", "mIoU", *[b[2] for b in AREA_BUCKETS]], rows))
    print(f"{len(area)} test masks of {cfg['enc_scenes']} scenes at {S} px; coordinates in {cfg['bins']} bins; "
          f"polygons: at most k vertices (2 tokens each) over all boundary loops, holes too; "
          f"SAMTok encode + decode {len(area) / t_codec:.0f} masks/s, one scene a call")
    samtok, p16 = result["SAMTok, 2 codes"]["miou"], result.get("polygon, 16 vertices", {}).get("miou")
    return {"encodings": result, "encodings_masks": int(len(area)),
            "samtok_vs_polygon16": None if p16 is None else samtok - p16}


# ============================================================================ sft
STEP_LINE = re.compile(r"step\s+(\d+)/\d+ \| loss ([\d.]+) .*?\| (\d+) ms/step \| (\d+) tok/s")


def sft_stream(cfg, samples, n_steps):
    """The micro-batches of sft.py's first n_steps steps, in its order (one process)."""
    import sft
    stream = sft.micro_batches([len(s["ids"]) for s in samples], cfg["batch_size"], cfg["seed"], cfg["bucket_pool"])
    return [[next(stream) for _ in range(cfg["grad_accum"])] for _ in range(n_steps)]


def trl_rows(samples, images):
    """sft.py's conversations as TRL's conversational vision rows: the image once, before the
    first user text; the assistant turns are what the loss covers (assistant_only_loss)."""
    from PIL import Image
    rows = []
    for s in samples:
        msgs = []
        for turn in s["turns"]:
            msgs += [{"role": "user", "content": turn["prompt"]}, {"role": "assistant", "content": turn["answer"]}]
        rows.append({"images": [Image.fromarray(images[s["img"]])], "messages": msgs})
    return rows


def training_template():
    """sft.CHAT_TEMPLATE with TRL's {% generation %} markers around each assistant reply and its
    <|im_end|>: what assistant_only_loss needs to label exactly the tokens sft.py labels. The
    newline after <|im_end|> is written as an expression (transformers renders templates with
    trim_blocks, which would eat a literal newline after a block tag), and not after the last
    turn: sft.py's sequences end at the last reply's <|im_end|>."""
    import sft
    body = ("{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>")
    if body + "\n" not in sft.CHAT_TEMPLATE:
        raise RuntimeError("sft.CHAT_TEMPLATE changed: update bench.training_template")
    marked = ("{% if message['role'] == 'assistant' %}{% generation %}" + body + "{% endgeneration %}"
              "{% else %}" + body + "{% endif %}{% if not loop.last %}{{ '\\n' }}{% endif %}")
    return sft.CHAT_TEMPLATE.replace(body + "\n", marked)


def step_clock(device):
    """A Trainer callback that times each optimizer step from the end of the previous one (the
    first from the start of training): wall clock of everything the Trainer does between two
    steps, data loading and collation included (the Trainer fetches a step's batches before
    its on_step_begin), as sft.py's and grpo.py's step lines count theirs. Keeps the logs."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last, self.seconds, self.logs = 0.0, [], []

        def on_train_begin(self, args, state, control, **kw):
            sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))
    return StepClock()


def run_trl_sft(cfg, model, processor, images, samples, steps, device):
    """TRL's SFTTrainer on the same model, rows and micro-batches (in sft.py's order), same
    optimiser settings. -> dict(step_seconds: list, losses: list, first_batch_ids_equal)."""
    import sft
    from torch.utils.data import DataLoader
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer
    from datasets import Dataset
    plan = sft_stream(cfg, samples, steps)
    order = [j for step in plan for mb in step for j in mb]
    ds = Dataset.from_list(trl_rows([samples[j] for j in order], images))
    batches, i = [], 0
    for step in plan:
        for mb in step:
            batches.append(list(range(i, i + len(mb))))
            i += len(mb)
    processor.chat_template = training_template()
    # sft.py's optimiser and schedule, handed to the Trainer, so that both sides take the same
    # steps: AdamW without decay on 1-d parameters, warmup + cosine from common.lr_at (HF's own
    # warmup starts at lr 0, ours at lr / warmup steps)
    sft.set_trainable(model, cfg)
    opt = sft.adamw([p for p in model.parameters() if p.requires_grad], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, steps, 1.0, cfg["warmup_frac"], cfg["min_lr_ratio"]))
    with warnings.catch_warnings():      # transformers' deprecation notes about TRL's own defaults
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(
            output_dir=os.path.join(cfg["out_dir"], "trl"), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
            gradient_accumulation_steps=cfg["grad_accum"], max_grad_norm=cfg["grad_clip"], assistant_only_loss=True,
            gradient_checkpointing=cfg["grad_checkpointing"], max_length=None, bf16=device.type == "cuda",
            use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none",
            dataloader_num_workers=0, seed=cfg["seed"], disable_tqdm=True, log_level="warning")

    class SameBatches(SFTTrainer):
        """sft.py's micro-batches, in its order (TRL would shuffle its own)."""
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=batches,
                                                       collate_fn=self.data_collator))

    clock = step_clock(device)
    with warnings.catch_warnings():      # transformers' deprecation notes about TRL's own defaults
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SameBatches(model=model, args=args, train_dataset=ds, processing_class=processor,
                              callbacks=[clock], optimizers=(opt, sched))
    trainer.remove_callback(PrinterCallback)   # its per-step dicts; our table says it
    # the first micro-batch through TRL's collator against sft.collate: the same token ids and
    # pixels, and the loss on the same positions (both hold unshifted labels, -100 elsewhere)
    ours, labels = sft.collate([samples[j] for j in plan[0][0]], images, processor)
    theirs = trainer.data_collator([ds[k] for k in batches[0]])
    same_ids = ours["input_ids"].shape == theirs["input_ids"].shape and bool((ours["input_ids"] == theirs["input_ids"]).all()) \
        and torch.equal(ours["pixel_values"], theirs["pixel_values"])
    same_labels = same_ids and bool((labels == theirs["labels"]).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    losses = [float(x["loss"]) for x in clock.logs if "loss" in x]
    return dict(step_seconds=clock.seconds, losses=losses, same_ids=same_ids, same_labels=same_labels)


def run_sft_py(args, N, w):
    """sft.py in its own process, exactly as a user runs it. Its step lines (log_every=1) give
    cumulative ms/step and tok/s since its loop began: the steps after the warm-up are the
    difference of the cumulative totals at steps N and w. -> tok/s, ms/step, loss by step."""
    proc = subprocess.run([sys.executable, "sft.py", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        raise UserError(f"sft.py {' '.join(args)} exited with code {proc.returncode}: {last_line(proc.stderr)}")
    steps = {int(m[1]): (float(m[2]), int(m[3]), int(m[4])) for m in STEP_LINE.finditer(proc.stdout)}
    if set(steps) != set(range(1, N + 1)):
        raise RuntimeError(f"could not read sft.py's step lines (got steps {sorted(steps)[:5]}...)")
    T = lambda s: steps[s][1] * s / 1e3
    tokens = steps[N][2] * T(N) - steps[w][2] * T(w)
    return dict(tok_s=tokens / (T(N) - T(w)), ms=(T(N) - T(w)) / (N - w) * 1e3, losses=[steps[s][0] for s in range(1, N + 1)])


def bench_sft(cfg, device):
    N, w = cfg["sft_steps"], cfg["sft_warmup"]
    if N <= w:
        raise UserError(f"--sft_steps={N} must be larger than --sft_warmup={w}")
    if try_import("trl") is None:
        print(f"sft: trl is not installed ({PEER_PIP}); skipped")
        return {"sft_speed_ratio": None, "sft": {"skipped": "trl missing"}}
    import sft
    if not os.path.exists(cfg["tokenizer_ckpt"]):
        raise UserError(f"no tokenizer checkpoint at {cfg['tokenizer_ckpt']}: run `python tokenizer.py` first")
    args = [a for a in cfg["sft_args"].split() if a] + [
        f"--out_dir={cfg['sft_out']}", f"--tokenizer_ckpt={cfg['tokenizer_ckpt']}", f"--steps={N}", "--eval_n=0",
        "--log_every=1", f"--ckpt_every={10 ** 9}", f"--device={device.type}", f"--seed={cfg['seed']}"]
    from tokenizer import load_tokenizer
    scfg = configure(sft.DEFAULTS, sft.PRESETS, args)
    ours, trl = [], []
    # runs alternate ours, TRL, TRL, ours, ... so a change of the machine's load hits both alike
    for r in range(cfg["sft_repeats"]):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            if side == "ours":
                ours.append(run_sft_py(args, N, w))
                continue
            # TRL: this process, the same weights on the same conversations as the sft.py process
            torch.manual_seed(scfg["seed"])
            model, processor, images, samples, *_ = sft.setup(scfg, load_tokenizer(scfg["tokenizer_ckpt"]),
                                                              scfg["tasks"].split(","), "")
            res = run_trl_sft(scfg, model.to(device), processor, images, samples, N, device)
            tokens = [sum(len(samples[j]["ids"]) for mb in step for j in mb) for step in sft_stream(scfg, samples, N)]
            t = sum(res["step_seconds"][w:])
            trl.append(dict(res, tok_s=sum(tokens[w:]) / t, ms=t / (N - w) * 1e3))
    med = lambda runs, k: float(np.median([x[k] for x in runs]))
    first = lambda v: v[0] if v else None
    last = lambda v: v[-1] if v else None
    rows = [["sft.py", med(ours, "ms"), med(ours, "tok_s"), first(ours[0]["losses"]), last(ours[0]["losses"])],
            ["TRL SFTTrainer", med(trl, "ms"), med(trl, "tok_s"), first(trl[0]["losses"]), last(trl[0]["losses"])]]
    print(table(["trainer", "ms / step", "tokens / s", "loss, step 1", f"loss, step {N}"], rows))
    print(f"same token ids and pixels in the first batch: {trl[0]['same_ids']}, same loss positions: "
          f"{trl[0]['same_labels']}; {N - w} steps timed after {w}, median of {cfg['sft_repeats']} runs a side; "
          f"{scfg['batch_size']} conversations a step; device {device.type}")
    return {"sft_speed_ratio": rows[0][2] / rows[1][2],
            "sft": dict(steps=N, warmup=w, repeats=cfg["sft_repeats"], batch_size=scfg["batch_size"],
                        ours_tok_s=rows[0][2], trl_tok_s=rows[1][2], ours_ms_step=rows[0][1], trl_ms_step=rows[1][1],
                        ours_tok_s_runs=[x["tok_s"] for x in ours], trl_tok_s_runs=[x["tok_s"] for x in trl],
                        ours_loss_first=rows[0][3], ours_loss_last=rows[0][4], trl_loss_first=rows[1][3],
                        trl_loss_last=rows[1][4], same_ids=trl[0]["same_ids"], same_labels=trl[0]["same_labels"],
                        sft_args=cfg["sft_args"])}


# ============================================================================ grpo
GRPO_LINE = re.compile(r"step\s+(\d+)/\d+ \| reward ([\d.]+) .*?\| len ([\d.]+) .*?\| (\d+) ms/step "
                       r"\((\d+)% sampling\) \| (\d+) completions/s")


def run_trl_grpo(cfg, device, steps):
    """TRL's GRPOTrainer on grpo.py's start policy, prompts (in grpo.py's order), G, max tokens,
    completions a step, micro-batches, loss (grpo aggregation, no KL), optimiser and schedule,
    reward (grpo.reward_match on TRL's decoded text). -> step seconds, completion lengths, rewards."""
    import grpo
    import sft
    from datasets import Dataset
    from PIL import Image
    from tokenizer import load_tokenizer
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer
    torch.manual_seed(cfg["seed"])
    tok = load_tokenizer(cfg["tokenizer_ckpt"])
    images, prompts, _ = grpo.load_prompts(cfg, tok)
    model, processor = grpo.load_policy(grpo.resolve_init(cfg["init_from"]), cfg)
    prompts = grpo.tokenize_prompts(prompts, images, processor)
    G = cfg["num_generations"]
    stream = sft.micro_batches([len(p["ids"]) for p in prompts], cfg["batch_size"] // G, cfg["seed"], 16)
    order = [j for _ in range(steps) for j in next(stream)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": prompts[j]["prompt"]}],
                             "image": Image.fromarray(images[prompts[j]["img"]]), "answer": prompts[j]["answer"]}
                            for j in order])

    def reward(completions, answer, **kw):
        return [grpo.reward_match(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, cfg["beta2"]), weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, 1.0, cfg["warmup_frac"], cfg["min_lr_ratio"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = GRPOConfig(
            output_dir=os.path.join(cfg["out_dir"], "trl"), max_steps=steps, per_device_train_batch_size=cfg["micro_batch"],
            gradient_accumulation_steps=cfg["batch_size"] // cfg["micro_batch"], num_generations=G,
            max_completion_length=cfg["max_new_tokens"], temperature=cfg["temperature"], top_p=1.0, top_k=0,
            beta=cfg["beta"], epsilon=cfg["eps_low"], epsilon_high=cfg["eps_high"], loss_type=cfg["loss_type"],
            scale_rewards=cfg["scale_rewards"], num_iterations=cfg["num_iterations"], max_grad_norm=cfg["grad_clip"],
            shuffle_dataset=False, gradient_checkpointing=cfg["grad_checkpointing"], bf16=device.type == "cuda",
            use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none", seed=cfg["seed"],
            disable_tqdm=True, log_level="warning")

    clock = step_clock(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(model=model.to(device), reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=processor, callbacks=[clock], optimizers=(opt, sched))
    trainer.remove_callback(PrinterCallback)
    # the first prompt as TRL renders it against grpo.py's ids
    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                              "text": prompts[order[0]]["prompt"]}]}], add_generation_prompt=True,
                                             tokenize=False)
    same_prompt = processor(images=[images[prompts[order[0]]["img"]]], text=[rendered])["input_ids"][0] \
        == prompts[order[0]]["ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    logs = [x for x in clock.logs if "reward" in x]
    lengths = [float(x.get("completions/mean_length", float("nan"))) for x in logs]
    rewards = [float(x["reward"]) for x in logs]
    return dict(step_seconds=clock.seconds, lengths=lengths, rewards=rewards, same_prompt=same_prompt)


def bench_grpo(cfg, device):
    N, w = cfg["grpo_steps"], cfg["grpo_warmup"]
    if N <= w:
        raise UserError(f"--grpo_steps={N} must be larger than --grpo_warmup={w}")
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "grpo.py")):
        print("grpo: grpo.py does not exist yet; skipped")
        return {"grpo_speed_ratio": None, "grpo": {"skipped": "grpo.py missing"}}
    if try_import("trl") is None:
        print(f"grpo: trl is not installed ({PEER_PIP}); skipped")
        return {"grpo_speed_ratio": None, "grpo": {"skipped": "trl missing"}}
    import grpo
    args = [a for a in cfg["grpo_args"].split() if a] + [
        f"--out_dir={cfg['grpo_out']}", f"--tokenizer_ckpt={cfg['tokenizer_ckpt']}", f"--steps={N}", "--eval_n=0",
        "--log_every=1", f"--ckpt_every={10 ** 9}", f"--device={device.type}", f"--seed={cfg['seed']}"]
    gcfg = configure(grpo.DEFAULTS, grpo.PRESETS, args)
    grpo.check(gcfg, 1)
    if gcfg["reward"] != "match" or gcfg["format_weight"] or gcfg["data"] != "shapes":
        raise UserError("the grpo section compares the paper's reward (--reward=match, no format term) on the synthetic world")
    try:
        grpo.resolve_init(gcfg["init_from"])
    except UserError as e:
        raise UserError(f"grpo section: {e}")
    # ---- grpo.py, its own process; per-step lines (log_every=1) give each step's figures
    proc = subprocess.run([sys.executable, "grpo.py", *args], capture_output=True, text=True, cwd=here)
    if proc.returncode != 0:
        raise UserError(f"grpo.py {' '.join(args)} exited with code {proc.returncode}: {last_line(proc.stderr)}")
    lines = {int(m[1]): dict(reward=float(m[2]), length=float(m[3]), ms=int(m[4]), sampling=int(m[5]) / 100,
                             comp_s=int(m[6])) for m in GRPO_LINE.finditer(proc.stdout)}
    if set(lines) != set(range(1, N + 1)):
        raise RuntimeError(f"could not read grpo.py's step lines (got steps {sorted(lines)[:5]}...)")
    timed = [lines[s] for s in range(w + 1, N + 1)]
    ours_s = sum(x["ms"] for x in timed) / 1e3
    ours_comp_s = gcfg["batch_size"] * len(timed) / ours_s
    # ---- TRL, this process
    trl = run_trl_grpo(gcfg, device, N)
    trl_s = sum(trl["step_seconds"][w:])
    trl_comp_s = gcfg["batch_size"] * (N - w) / trl_s
    mean = lambda v: float(np.mean(v)) if len(v) else None
    rows = [["grpo.py", ours_s / len(timed) * 1e3, ours_comp_s, mean([x["length"] for x in timed]),
             mean([x["sampling"] for x in timed]), mean([x["reward"] for x in lines.values()])],
            ["TRL GRPOTrainer", trl_s / (N - w) * 1e3, trl_comp_s, mean(trl["lengths"][w:]), None, mean(trl["rewards"])]]
    print(table(["trainer", "ms / step", "completions / s", "completion tokens (mean)", "sampling share",
                 "mean reward"], rows))
    print(f"{gcfg['batch_size']} completions a step ({gcfg['batch_size'] // gcfg['num_generations']} prompts x "
          f"G={gcfg['num_generations']}), at most {gcfg['max_new_tokens']} new tokens, micro-batches of "
          f"{gcfg['micro_batch']}; {N - w} steps timed after {w}; same prompt ids: {trl['same_prompt']}; "
          f"policy {gcfg['init_from']}; device {device.type}")
    return {"grpo_speed_ratio": ours_comp_s / trl_comp_s,
            "grpo": dict(steps=N, warmup=w, completions_per_step=gcfg["batch_size"], G=gcfg["num_generations"],
                         max_new_tokens=gcfg["max_new_tokens"], ours_completions_s=ours_comp_s,
                         trl_completions_s=trl_comp_s, ours_ms_step=ours_s / len(timed) * 1e3,
                         trl_ms_step=trl_s / (N - w) * 1e3, ours_mean_length=rows[0][3], trl_mean_length=rows[1][3],
                         ours_sampling_share=rows[0][4], same_prompt=trl["same_prompt"], grpo_args=cfg["grpo_args"])}


# ============================================================================ gpu check
# Real sizes, random weights, nothing downloaded. Qwen2.5-VL-3B's published configuration, built
# through sft.build_model (which uses global attention in every vision block: at 448 px a
# window of 112 px would only save a little attention work).
QWEN25_VL_3B = dict(hidden_size=2048, n_layers=36, n_heads=16, n_kv_heads=2, intermediate_size=11008,
                    vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, patch_size=14,
                    tie_embeddings=True, vocab_pad=151_936)
TINY_VLM = dict(hidden_size=64, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=128, vision_hidden=32,
                vision_depth=1, vision_heads=2, vision_intermediate=64, bpe_vocab=600, vision_pretrain_steps=0)
DRY_RUN = dict(gpu_steps=2, gpu_warmup=1, gpu_tok_images=2, gpu_tok_masks=2, gpu_sft_batch=2, gpu_sft_image=64,
               gpu_gen_prompts=2, gpu_gen_group=2, gpu_gen_tokens=4)


def random_code_world(n):
    """n train scenes with SFT samples whose mask words are random codes: what a speed check
    needs (the right token counts and shapes) without running the Stage-1 tokenizer."""
    import sft
    from data import iter_scenes
    scenes = list(iter_scenes("train", n))
    rng = np.random.default_rng(0)
    samples = []
    for k, (seed, s) in enumerate(scenes):
        codes = rng.integers(0, 256, (len(s["masks"]), 2))
        samples += [dict(x, img=k) for x in sft.scene_samples(seed, s, codes, ("refer", "caption", "gcg"))]
    return np.stack([s["image"] for _, s in scenes]), samples, scenes


def timed_steps(step, n, warmup, device):
    """Runs step() warmup + n times; -> seconds per step over the last n."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t) / n


def gpu_tokenizer(cfg, device, dry):
    """Stage-1 training steps at SAM2.1 Hiera-L / 1024 px (--preset=paper of tokenizer.py): the
    frozen image encoder under no_grad, the mask encoder, the RVQ and the SAM2 decoder learning,
    loss 2 BCE + 0.5 Dice + commitment, bf16 autocast on GPU. Masks are random boxes."""
    import tokenizer as T
    tcfg = configure(T.DEFAULTS, T.PRESETS, ["--image_size=64", "--d_model=32", "--mlp_dim=64"] if dry else ["--preset=paper"])
    with torch.device(device):
        model = T.SAMTok(tcfg)
    frozen = [model.image_encoder, model.sam_prompt_encoder, model.sam_mask_decoder.iou_prediction_head,
              model.sam_mask_decoder.pred_obj_score_head]
    for m in frozen:
        m.requires_grad_(False)
    model.no_mem_embed.requires_grad_(False)
    model.train()
    model.image_encoder.eval()
    model.rvq.init_codebooks(torch.randn(4 * tcfg["codebook_size"], tcfg["d_model"], device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    S, g, I, M = tcfg["image_size"], model.grid, cfg["gpu_tok_images"], cfg["gpu_tok_masks"]
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (I, S, S, 3), dtype=torch.uint8, device=device, generator=gen)
    lo = torch.rand(I * M, 2, device=device, generator=gen) * 0.6 * S
    hi = lo + (0.1 + 0.3 * torch.rand(I * M, 2, device=device, generator=gen)) * S
    boxes = torch.cat([lo, hi], 1).floor()                                       # (I*M, 4) xyxy
    c = torch.arange(S, device=device) + 0.5
    gt = ((c[None, :, None] > boxes[:, 1, None, None]) & (c[None, :, None] < boxes[:, 3, None, None])
          & (c[None, None, :] > boxes[:, 0, None, None]) & (c[None, None, :] < boxes[:, 2, None, None]))
    prompts = F.interpolate(gt[:, None].float(), size=(4 * g, 4 * g), mode="bilinear", antialias=True)
    img_idx = torch.arange(I, device=device).repeat_interleave(M)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with torch.no_grad(), amp:       # frozen encoder: features without a graph (paper: not cached)
            fpn = [f.float() for f in model.image_features(model.preprocess(images))]
        with amp:
            logits, iou_pred, commit, _ = model(fpn, prompts, boxes, mode="quant", img_idx=img_idx)
            loss, _ = T.mask_loss(logits.float(), iou_pred, gt, tcfg)
        (loss + commit).backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed_steps(step, cfg["gpu_steps"], cfg["gpu_warmup"], device)
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt
    return dict(image_size=S, images_per_step=I, masks_per_step=I * M, ms_per_step=dt * 1e3, masks_per_s=I * M / dt,
                params_m=n_params / 1e6)


def vlm_flops(model, samples, batches, image_tokens, vision_trained):
    """Training FLOPs of a step's worth of sequences: 6 x (matmul parameters) per token for the
    LLM (input embedding excluded, LM head included), plus attention 12 x layers x width x n^2
    per sequence of n (forward + backward, no causal discount: the PaLM convention); the vision
    tower the same per patch when it trains, a third of it (forward only) when it is frozen."""
    import sft
    lm = sft.decoder_layers(model)
    llm_params = sum(p.numel() for p in lm.parameters()) + model.get_output_embeddings().weight.numel()
    vis = sft.vision_tower(model)
    vis_params = sum(p.numel() for p in vis.parameters())
    d, L = model.config.text_config.hidden_size, len(lm)
    dv, Lv = model.config.vision_config.hidden_size, model.config.vision_config.depth
    patches = 4 * image_tokens            # the merger joins 2 x 2 patches into one LLM token
    flops = 0.0
    for mb in batches:
        for j in mb:
            n = len(samples[j]["ids"])
            flops += 6 * llm_params * n + 12 * L * d * n * n
            flops += (6 * vis_params * patches + 12 * Lv * dv * patches * patches) / (1 if vision_trained else 3)
    return flops


def gpu_sft(cfg, device, dry):
    """sft.py's training step (sft.collate, sft.token_loss, its AdamW) at Qwen2.5-VL-3B size in
    bf16 autocast, on the synthetic world's conversations with random mask codes. As the paper
    (and --preset=paper of sft.py): vision tower frozen, projector (merger) and LLM trained."""
    import sft
    over = dict(TINY_VLM if dry else QWEN25_VL_3B, image_size=cfg["gpu_sft_image"], batch_size=cfg["gpu_sft_batch"],
                freeze_vision=True)
    scfg = configure(sft.DEFAULTS, sft.PRESETS, [f"--{k}={v}" for k, v in over.items()])
    images, samples, scenes = random_code_world(16 if dry else 64)
    processor = sft.build_processor(scfg, sft.text_corpus([s for _, s in scenes]))
    torch.manual_seed(0)
    t = time.time()
    with torch.device(device):      # random init straight on the GPU (minutes on CPU at 3B)
        model = sft.build_model(scfg, processor)
        word_ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    build_s = time.time() - t
    convs, _ = sft.tokenize(sft.conversations(samples, scfg["turns"], 0), images, processor, scfg["max_len"])
    stream = sft.micro_batches([len(c["ids"]) for c in convs], scfg["batch_size"], 0, scfg["bucket_pool"])
    sft.set_trainable(model, scfg)
    model.config.use_cache = False
    model.train()
    opt = sft.adamw([p for p in model.parameters() if p.requires_grad], scfg)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    used, tokens = [], [0]
    image_tokens = (scfg["image_size"] // scfg["patch_size"]) ** 2 // 4

    def step():
        mb = next(stream)
        used.append(mb)
        batch, labels = sft.collate([convs[j] for j in mb], images, processor)
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens[0] += int(batch["attention_mask"].sum())
        with amp:
            loss, _ = sft.token_loss(model, batch, labels.to(device), word_ids)
        n_tok = int((labels[:, 1:] != -100).sum())
        (loss / max(n_tok, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), scfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(cfg["gpu_warmup"]):
        step()
    used.clear()
    tokens[0] = 0
    dt = timed_steps(step, cfg["gpu_steps"], 0, device)
    tok_s = tokens[0] / (dt * cfg["gpu_steps"])
    flops = vlm_flops(model, convs, used, image_tokens, not scfg["freeze_vision"]) / (dt * cfg["gpu_steps"])
    n_params = sum(p.numel() for p in model.parameters())
    peak = cfg["peak_tflops"] * 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del opt
    return model, processor, images, convs, dict(
        params_b=n_params / 1e9, build_seconds=build_s, conversations_per_step=scfg["batch_size"],
        tokens_per_step=tokens[0] / cfg["gpu_steps"], ms_per_step=dt * 1e3, tokens_per_s=tok_s,
        model_tflops=flops / 1e12, mfu=flops / peak, mfu_6n=6 * n_params * tok_s / peak, peak_mem_gib=mem)


def gpu_generation(cfg, device, model, processor, images, convs):
    """GRPO's rollout phase: G sampled completions for each prompt (the referring prompts' first
    turn), batched with left padding, in bf16, max gpu_gen_tokens new tokens each."""
    import sft
    model = model.to(torch.bfloat16)        # rollouts read bf16 weights (autocast would recast every step)
    model.eval()
    model.config.use_cache = True
    P, G, T = cfg["gpu_gen_prompts"], cfg["gpu_gen_group"], cfg["gpu_gen_tokens"]
    prompts = [dict(c, ids=c["ids"][:c["n_prompt"]], lab=[False] * c["n_prompt"]) for c in convs[:P]]
    inputs, _ = sft.collate(prompts, images, processor, left_pad=True)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    tok = processor.tokenizer
    new = []

    def step():
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=G,
                                 max_new_tokens=T, pad_token_id=tok.pad_token_id)
        new.append(out.shape[1] - inputs["input_ids"].shape[1])

    dt = timed_steps(step, max(1, cfg["gpu_steps"] // 4), 1, device)
    return dict(prompts=P, group=G, max_new_tokens=T, seconds_per_batch=dt, completions_per_s=P * G / dt,
                new_tokens_per_s=P * G * new[-1] / dt)


def gpu_check(cfg, device):
    """Issue 5's GPU check, or with --dry_run the same code at tiny sizes on the CPU."""
    dry = cfg["dry_run"]
    if dry:
        cfg = dict(cfg, **DRY_RUN)
    t0 = time.time()
    out = {"dry_run": dry, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    rows = []

    def guarded(name, fn):
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as e:     # a figure that does not fit is a figure too
            torch.cuda.empty_cache()
            out[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            return None

    tk = guarded("gpu_tokenizer", lambda: gpu_tokenizer(cfg, device, dry))
    if tk:
        out["gpu_tokenizer"] = tk
        rows.append([f"tokenizer training, {'tiny' if dry else 'SAM2.1-L'}, {tk['image_size']} px ({tk['params_m']:.0f} M)",
                     f"{tk['images_per_step']} images / "
                     f"{tk['masks_per_step']} masks", f"{tk['ms_per_step']:.0f} ms/step", f"{tk['masks_per_s']:.0f} masks/s"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    res = guarded("gpu_sft", lambda: gpu_sft(cfg, device, dry))
    if res:
        model, processor, images, convs, sf = res
        out["gpu_sft"] = sf
        mem = "" if sf["peak_mem_gib"] is None else f", peak {sf['peak_mem_gib']:.0f} GiB"
        rows.append([f"SFT, {'tiny VLM' if dry else 'Qwen2.5-VL-3B size'} ({sf['params_b'] * 1e3:.1f} M), bf16{mem}",
                     f"{sf['tokens_per_step']:.0f} tokens",
                     f"{sf['ms_per_step']:.0f} ms/step", f"{sf['tokens_per_s']:.0f} tokens/s, MFU {sf['mfu']:.1%} "
                     f"(6N: {sf['mfu_6n']:.1%})"])
        gen = guarded("gpu_generation", lambda: gpu_generation(cfg, device, model, processor, images, convs))
        if gen:
            out["gpu_generation"] = gen
            rows.append(["GRPO generation, same model, bf16", f"{gen['prompts']} prompts x G={gen['group']}",
                         f"{gen['seconds_per_batch']:.2f} s/batch", f"{gen['completions_per_s']:.1f} completions/s, "
                         f"{gen['new_tokens_per_s']:.0f} tokens/s"])
    out["seconds"] = time.time() - t0
    print(table(["check", "batch", "time", "throughput"], rows))
    print(f"{'dry run (tiny sizes, CPU)' if dry else out['device']}: {out['seconds']:.0f} s in all")
    return {"gpu_check": out}


# ============================================================================ main
def main():
    from transformers.utils import logging
    logging.disable_progress_bar()      # no bar per weight file
    argv = [a + "=true" if a in ("--gpu_check", "--dry_run") else a for a in sys.argv[1:]]
    try:
        cfg = configure(DEFAULTS, PRESETS, argv)
        if cfg["gpu_check"] or cfg["dry_run"]:
            cfg["only"] = "gpu"
        only = [s for s in cfg["only"].split(",") if s]
        bad = [s for s in only if s not in SECTIONS]
        if bad or not only:
            raise UserError(f"--only={cfg['only']!r}: choose from {','.join(SECTIONS)}")
        device = pick_device("cpu" if cfg["dry_run"] else cfg["device"])
        if "gpu" in only and not cfg["dry_run"] and device.type != "cuda":
            raise UserError("--gpu_check needs a GPU; --dry_run runs its code paths at tiny sizes on CPU")
        results = {}
        for name in only:
            print(f"\n## {name}\n")
            t = time.time()
            results.update(globals()[FUNCS[name]](cfg, device))
            print(f"({name}: {time.time() - t:.0f} s)")
    except UserError as e:
        die(e)
    old = {}
    if os.path.exists(cfg["out"]):
        try:
            with open(cfg["out"]) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
    old.update(results)
    old["last_run"] = {"sections": only, "device": str(device), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "torch_threads": torch.get_num_threads()}
    write_json(cfg["out"], old)
    rows = summary_rows(old)
    if rows:
        print("\n## summary (all figures in " + cfg["out"] + ")\n")
        print(table(["figure", "measured", "target", "reached"], rows))
    print(f"\nwrote {cfg['out']} ({', '.join(only)})")


def summary_rows(r):
    """The issue's numbers to reach, against what out/bench.json holds."""
    rows = []
    yes = lambda ok: "yes" if ok else "no"
    if r.get("rvq_speed_ratio") is not None:
        rows.append(["quantizer speed, ours / vector-quantize-pytorch", f"{r['rvq_speed_ratio']:.2f}x", ">= 1.0x",
                     yes(r["rvq_speed_ratio"] >= 1.0)])
    if r.get("rvq_codes_agree") is not None:
        rows.append(["quantizer codes identical", f"{r['rvq_codes_agree']:.2%}", "100%", yes(r["rvq_codes_agree"] == 1.0)])
    enc = r.get("encodings") if isinstance(r.get("encodings"), dict) else {}
    if "SAMTok, 2 codes" in enc and "polygon, 16 vertices" in enc:
        a, b = enc["SAMTok, 2 codes"]["miou"], enc["polygon, 16 vertices"]["miou"]
        rows.append(["mIoU, SAMTok 2 codes (4 tokens) vs 16-vertex polygons (32 tokens)", f"{a:.3f} vs {b:.3f}",
                     ">= polygons", yes(a >= b)])
    for key, name, target in (("sft_speed_ratio", "SFT tokens/s, sft.py / TRL SFTTrainer", 1.2),
                              ("grpo_speed_ratio", "GRPO completions/s, grpo.py / TRL GRPOTrainer", 1.5)):
        if r.get(key) is not None:
            rows.append([name, f"{r[key]:.2f}x", f">= {target}x", yes(r[key] >= target)])
    return rows


FUNCS = {"resolution": "bench_resolution", "rvq": "bench_rvq", "encodings": "bench_encodings",
         "sft": "bench_sft", "grpo": "bench_grpo", "gpu": "gpu_check"}

if __name__ == "__main__":
    main()
