"""
Benchmarks, like nanoGPT's bench.py: measurements that explain the figures the stages report.

So far one: the resolution reference of SAM2's mask decoder on the synthetic world. The decoder
paints low-res logits at 4x the stride-16 feature grid (256x256 at 1024 px; 32x32 at the tiny
preset's 128 px), and the mask is those logits upsampled bilinearly and thresholded. No decoder
draws a boundary much finer than that grid allows; the reference is what *ideal smooth*
logits give: the mask's signed distance field averaged over each logit cell, upsampled the
same way. (A learned decoder can beat it a little on tiny masks by sharpening its logits: it
is a reference, not a hard bound.) No model is involved: this is a property of the
data and the resolution alone. Tiny masks (< 0.5 % of the image, ~13 px across at 128 px)
are where the 32x32 grid hurts.

    python bench.py                      # the tiny preset's 128 px, 32/48/64 logit grids
    python bench.py --image_size=256 --n=200
Writes out/bench.json.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, configure, die, write_json

DEFAULTS = dict(image_size=128, n=100, grids=(32, 48, 64), out="out/bench.json")


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


def main():
    try:
        cfg = configure(DEFAULTS, {"tiny": {}, "paper": {}})
    except UserError as e:
        die(e)
    from data import iter_scenes
    from tokenizer import AREA_BUCKETS, iou
    S = cfg["image_size"]
    masks = np.concatenate([s["masks"] for _, s in iter_scenes("val", cfg["n"], size=S)])
    area = masks.reshape(len(masks), -1).mean(1)
    sdf = torch.tensor(np.stack([signed_distance(m) for m in masks]))[:, None]
    results = {}
    print(f"| logit grid | ideal-logit mIoU | " + " | ".join(b[2] for b in AREA_BUCKETS) + " |")
    print("|---" * (2 + len(AREA_BUCKETS)) + "|")
    for g in cfg["grids"]:
        lo = F.interpolate(sdf, size=(g, g), mode="area")
        up = F.interpolate(lo, size=(S, S), mode="bilinear", align_corners=False)[:, 0] > 0
        ious = iou(up.numpy(), masks)
        buckets = {name: float(ious[(area >= a) & (area < b)].mean()) for a, b, name in AREA_BUCKETS
                   if ((area >= a) & (area < b)).any()}
        results[g] = {"miou": float(ious.mean()), "by_area": buckets}
        print(f"| {g}x{g} | {ious.mean():.3f} | " + " | ".join(f"{v:.3f}" for v in buckets.values()) + " |")
    write_json(cfg["out"], {"resolution_reference": {"image_size": S, "masks": len(masks), "grids": results}})
    print(f"{len(masks)} val masks at {S} px; wrote {cfg['out']}")


if __name__ == "__main__":
    sys.exit(main())
