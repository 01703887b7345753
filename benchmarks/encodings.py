"""
Masks as other formats at a token budget: SAMTok's two codes (4 tokens with the delimiters
<|mt_start|> c1 c2 <|mt_end|>, 3 with level 1 only) against the tight box (4 coordinate tokens),
polygons of at most k vertices (2k tokens) and COCO's uncompressed RLE (one token per run),
tokens per mask against mIoU on the test split.

Kept identical: every encoding reads the same test masks at the tokenizer's resolution; boxes and
polygons quantize their coordinates to the same bins; SAMTok's count includes its delimiters, the
box's and the polygons' only their coordinates (no delimiters, no loop separators): generous to
them. Polygons come from a contour tracer along pixel edges, simplified over all boundary loops
(holes too, read with the even-odd rule); without simplification the round trip is exact.
"""

import heapq
import time

import numpy as np

from bench import by_area, sync, table
from common import iou


# Pixel (r, c) is the unit square [c, c+1] x [r, r+1]; polygon vertices are points on that grid of
# pixel corners, a pixel is inside a polygon when its centre (c + 0.5, r + 0.5) is.
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


def measure(cfg, device):
    """Tokens a mask (mean and max) and mIoU, overall and by mask area, of every encoding on the
    masks of cfg["enc_scenes"] test scenes, and SAMTok's encode + decode throughput."""
    from data import iter_scenes
    from data.jsonl import rle_decode, rle_encode
    from samtok import load_tokenizer
    from tokenizer import AREA_BUCKETS
    mask_tok = load_tokenizer(cfg["tokenizer_ckpt"], device)
    S = mask_tok.config.image_size
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
        codes = mask_tok.encode(image, masks)
        rebuilt = mask_tok.decode(image, codes)
        sync(device)
        t_codec += time.perf_counter() - t
        level1 = codes.clone()
        level1[:, 1] = -1                                      # level 2 missing: the mask from e1 alone
        ious["SAMTok, 2 codes"].append(iou(rebuilt, masks))
        ious["SAMTok, level 1 only"].append(iou(mask_tok.decode(image, level1), masks))
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
        buckets = by_area(v, area)
        result[n] = dict(tokens=float(np.mean(tokens[n])), tokens_max=int(np.max(tokens[n])), miou=float(v.mean()),
                         by_area=buckets)
        rows.append([n, float(np.mean(tokens[n])), int(np.max(tokens[n])), float(v.mean()), *buckets.values()])
    print(table(["encoding", "tokens a mask (mean)", "max", "mIoU", *[b[2] for b in AREA_BUCKETS]], rows))
    print(f"{len(area)} test masks of {cfg['enc_scenes']} scenes at {S} px; coordinates in {cfg['bins']} bins; "
          f"polygons: at most k vertices (2 tokens each) over all boundary loops, holes too; "
          f"SAMTok encode + decode {len(area) / t_codec:.0f} masks/s, one scene a call")
    samtok, p16 = result["SAMTok, 2 codes"]["miou"], result.get("polygon, 16 vertices", {}).get("miou")
    return {"encodings": result, "encodings_masks": int(len(area)),
            "samtok_vs_polygon16": None if p16 is None else samtok - p16}
