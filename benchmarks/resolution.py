"""
The resolution reference of SAM2's mask decoder. The decoder paints low-res logits at 4x the
stride-16 feature grid (256x256 at 1024 px; 32x32 at the tiny preset's 128 px), and the mask is
those logits upsampled bilinearly and thresholded. No decoder draws a boundary much finer than
that grid allows; the reference is what *ideal smooth* logits give: the mask's signed distance
field averaged over each logit cell, upsampled the same way. (A learned decoder can beat it a
little on tiny masks by sharpening its logits: a reference, not a hard bound.)

Kept identical across grids: no model, the same val masks for every grid, the same upsampling
and threshold; a property of the data and the resolution alone.
"""

import numpy as np
import torch
import torch.nn.functional as F

from bench import by_area, table
from common import iou


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


def measure(cfg, device):
    """Ideal-logit mIoU of cfg["n"] val scenes at cfg["image_size"] px, for each logit grid of cfg["grids"]."""
    from data import iter_scenes
    S = cfg["image_size"]
    masks = np.concatenate([s["masks"] for _, s in iter_scenes("val", cfg["n"], size=S)])
    area = masks.reshape(len(masks), -1).mean(1)
    sdf = torch.tensor(np.stack([signed_distance(m) for m in masks]))[:, None]      # (M, 1, S, S)
    results, rows = {}, []
    for g in cfg["grids"]:
        # ideal logits: the distance field averaged over each g x g cell, then the decoder's upsampling
        lo = F.interpolate(sdf, size=(g, g), mode="area")
        up = F.interpolate(lo, size=(S, S), mode="bilinear", align_corners=False)[:, 0] > 0
        ious = iou(up.numpy(), masks)
        buckets = by_area(ious, area)
        results[g] = {"miou": float(ious.mean()), "by_area": buckets}
        rows.append([f"{g}x{g}", float(ious.mean()), *buckets.values()])
    print(table(["logit grid", "ideal-logit mIoU", *buckets], rows))
    print(f"{len(masks)} val masks at {S} px")
    return {"resolution_reference": {"image_size": S, "masks": len(masks), "grids": results}}
