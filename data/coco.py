"""
COCO instance annotations -> the scene dicts every stage reads, one image at a time.

This module also holds what the other real-data readers (data/refcoco.py, data/sa1b.py) share:
the compressed-RLE codec, the polygon rasteriser, the annotation decoder with its counted skips,
the hash split, and a synthetic COCO-format writer for tests and the memory self-test.

A COCO instances file (COCO 2014/2017, LVIS, RefCOCO's instances.json, ...):

    {"images":      [{"id": 9, "file_name": "000000000009.jpg", "height": 480, "width": 640}, ...],
     "annotations": [{"id": 1, "image_id": 9, "category_id": 51, "iscrowd": 0,
                      "segmentation": ...}, ...],
     "categories":  [{"id": 51, "name": "bowl"}, ...]}

where "segmentation" is one of
    [[x1, y1, x2, y2, ...], ...]                  polygons in pixels (an object may have parts)
    {"size": [H, W], "counts": [n0, n1, ...]}      uncompressed RLE (COCO's crowd regions)
    {"size": [H, W], "counts": "PQ`0..."}          compressed RLE (SA-1B, LVIS, COCO results)
RLE runs are column-major and start with the 0s, as in data/jsonl.py. The stored "bbox" and
"area" are ignored: boxes are recomputed from the decoded masks, so they cannot disagree.

Each image becomes a scene like data.shapes.make_scene's: id (the file name), image (H, W, 3)
uint8, masks (N, H, W) bool, boxes (N, 4) xyxy float32, objects [{category, ann_id, iscrowd}],
and refs [], captions [], grounded {"text": "", "spans": []} (COCO has no text of its own).
Crowd regions are kept as masks (they are masks the tokenizer can learn) and flagged in objects.

Memory, the trade-off: the JSON is parsed whole (Python's json has no streaming parser), then
images are read, decoded and handed out one at a time. So memory = the annotation index + one
scene, whatever the number of images; the index grows with the number of annotations (not
pixels). `python -m data.coco --selftest=10000` measures it on a synthetic fixture.

Bad input: a missing or unparseable annotation file is fatal (UserError naming the file); a
missing or corrupt image, an annotation of an unknown image id, a polygon with fewer than 3
points, a mask outside the image or of another size, an empty mask: skipped, counted under
that reason in the `skipped` Counter, and summed up on stderr with one example of each.

    python -m data.coco --selftest=10000      # write a 10k-image fixture, stream it, peak RSS
"""
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from common import UserError
from data.jsonl import boxes_from_masks, load_rgb, rle_decode, rle_encode

OUTSIDE_TOLERANCE = 1.0   # polygon vertices may stray this many pixels past the border (rounding)


class Skip(Exception):
    """One unusable item (an image, an annotation, a referring expression): counted, not fatal."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Skips:
    """What one reader skipped: counted in the caller's `skipped` Counter (which several readers
    of a mixture may share) and in its own, with one example per reason for the summary line."""

    def __init__(self, name, skipped):
        self.name, self.shared, self.mine, self.examples = name, skipped, Counter(), {}

    def add(self, reason, where, n=1):
        self.mine[reason] += n
        if self.shared is not None:
            self.shared[reason] += n
        self.examples.setdefault(reason, where)

    def report(self):
        if self.mine:
            parts = [f"{k}={v} (e.g. {self.examples[k]})" for k, v in sorted(self.mine.items())]
            print(f"{self.name}: skipped " + ", ".join(parts), file=sys.stderr)

# ----------------------------------------------------------------------------- compressed RLE

def rle_from_string(s):
    """COCO's compressed RLE string -> list of run lengths.

    Each count is a little-endian base-32 varint written as ASCII (char - 48): 5 value bits,
    0x20 = "more characters follow", and on the last character 0x10 is the sign. From the
    fourth count on, a count is stored as the difference to the count two places before (the
    runs of 0s, and of 1s, change slowly from column to column), which keeps the numbers small.
    """
    counts, p, n = [], 0, len(s)
    while p < n:
        x = k = 0
        while True:
            if p >= n:
                raise ValueError("compressed RLE string ends in the middle of a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} cannot appear in a compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            p, k = p + 1, k + 1
            if not c & 0x20:               # last character of this number
                if c & 0x10:               # negative: sign-extend the 5k bits read so far
                    x -= 1 << (5 * k)
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_to_string(counts):
    """Inverse of rle_from_string: run lengths -> COCO's compressed RLE string."""
    out = []
    for i, x in enumerate(int(c) for c in counts):
        if i > 2:
            x -= int(counts[i - 2])
        while True:
            c, x = x & 0x1F, x >> 5        # Python's >> on negatives is arithmetic, as in C
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
            if not more:
                break
    return "".join(out)

# ----------------------------------------------------------------------------- polygons

def polygon_mask(polygons, h, w):
    """COCO polygons -> bool (h, w). Pixel (i, j) covers [j, j+1) x [i, i+1) and is in when its
    centre is inside a polygon (even-odd rule); the parts of an object are united.

    Scanline fill: along each row of pixel centres, every polygon edge crossing the row toggles
    "inside" from the first pixel centre right of the crossing on. All crossings of all rows are
    found at once (numpy), so a 640x480 object costs about a millisecond."""
    mask = np.zeros((h, w), bool)
    yc = np.arange(h) + 0.5                                           # (h,) row centres
    for poly in polygons:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        x0, y0 = xy[:, 0], xy[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)                     # edge k: vertex k -> k+1
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # half-open [lo, hi): a vertex exactly on a row is counted once, horizontal edges never
        rows, edges = np.nonzero((yc[:, None] >= lo) & (yc[:, None] < hi))
        t = (yc[rows] - y0[edges]) / (y1[edges] - y0[edges])
        xs = x0[edges] + t * (x1[edges] - x0[edges])                  # where edge crosses row
        cols = np.clip(np.floor(xs - 0.5).astype(np.int64) + 1, 0, w)
        toggles = np.zeros((h, w + 1), np.int32)
        np.add.at(toggles, (rows, cols), 1)
        mask |= np.cumsum(toggles[:, :w], axis=1) % 2 == 1
    return mask

# ----------------------------------------------------------------------------- annotations

def decode_segmentation(seg, h, w, skips=None, where=""):
    """One annotation's "segmentation" (polygons, RLE or compressed RLE) -> bool (h, w).

    Raises Skip(reason) for an unusable annotation. Polygon parts with fewer than 3 points are
    dropped (counted as polygon_part_too_few_points when other parts remain, else the whole
    annotation is skipped as polygon_too_few_points)."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        try:
            size = [int(size[0]), int(size[1])]
        except (TypeError, ValueError, IndexError):
            raise Skip("bad_rle")
        if size != [h, w]:
            raise Skip("mask_size_mismatch")        # an RLE of another image size: off the image
        try:
            if isinstance(counts, bytes):
                counts = counts.decode("ascii")
            if isinstance(counts, str):
                counts = rle_from_string(counts)
            mask = rle_decode({"size": size, "counts": counts})
        except (ValueError, TypeError, UnicodeDecodeError):
            raise Skip("bad_rle")
    elif isinstance(seg, list):
        parts, too_few = [], 0
        for poly in seg:
            try:
                xy = np.asarray(poly, np.float64)
            except (ValueError, TypeError):
                raise Skip("bad_polygon")
            if xy.ndim != 1 or len(xy) % 2 or not np.isfinite(xy).all():
                raise Skip("bad_polygon")
            if len(xy) < 6:
                too_few += 1
                continue
            xy = xy.reshape(-1, 2)
            if (xy < -OUTSIDE_TOLERANCE).any() or (xy[:, 0] > w + OUTSIDE_TOLERANCE).any() \
                    or (xy[:, 1] > h + OUTSIDE_TOLERANCE).any():
                raise Skip("mask_outside_image")
            parts.append(xy)
        if not parts:
            raise Skip("polygon_too_few_points" if too_few else "bad_polygon")
        if too_few and skips is not None:
            skips.add("polygon_part_too_few_points", where, too_few)
        mask = polygon_mask(parts, h, w)
    else:
        raise Skip("bad_segmentation")
    if not mask.any():
        raise Skip("empty_mask")
    return mask


def split_of(key):
    """Datasets without splits of their own are split 90 / 5 / 5 by a hash of each image's
    name: stable when the folder grows, no list of names to keep, and cheap to test before an
    image is read (so a val pass does not decode the train images)."""
    bucket = zlib.crc32(str(key).encode()) % 100
    return "train" if bucket < 90 else ("val" if bucket < 95 else "test")


def check_split(split):
    if split not in (None, "train", "val", "test"):
        raise UserError(f"split {split!r}: this dataset has no splits of its own, so it takes "
                        f"train, val or test (90/5/5 by a hash of the image name)")


def pick(anns, max_masks, seed, keep=()):
    """At most max_masks annotations of an image (0: all): the ones in `keep` (referred to by an
    expression) always, the rest a random subset seeded by the image, in file order."""
    if max_masks <= 0 or len(anns) <= max_masks:
        return anns
    must = [i for i, a in enumerate(anns) if a.get("id") in keep]
    rest = [i for i, a in enumerate(anns) if a.get("id") not in keep]
    rng = np.random.default_rng(zlib.crc32(str(seed).encode()))
    extra = rng.permutation(len(rest))[:max(0, max_masks - len(must))]
    return [anns[i] for i in sorted(must + [rest[j] for j in extra])]


def load_image(path, h, w):
    """The image at path as (H, W, 3) uint8, checked against the size the annotations expect."""
    if not os.path.isfile(path):
        raise Skip("missing_image")
    try:
        image = load_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise Skip("unreadable_image")
    if h is not None and image.shape[:2] != (h, w):
        raise Skip("image_size_mismatch")           # the masks would not line up with the pixels
    return image


def annotated_image(im, anns, image_dir, skips, cats=None):
    """One COCO image entry and its annotations -> (image, masks (N, H, W), the kept annotations,
    objects). Raises Skip for the whole image; bad annotations are counted and dropped."""
    name = im["file_name"]
    h, w = int(im["height"]), int(im["width"])
    image = load_image(os.path.join(image_dir, name), h, w)
    masks, kept, objects = [], [], []
    for a in anns:
        where = f"annotation {a.get('id')} of {name}"
        try:
            masks.append(decode_segmentation(a.get("segmentation"), h, w, skips, where))
        except Skip as e:
            skips.add(e.reason, where)
            continue
        kept.append(a)
        obj = {"ann_id": a.get("id"), "iscrowd": int(a.get("iscrowd", 0))}
        if cats is not None:
            obj["category"] = cats.get(a.get("category_id"), str(a.get("category_id")))
        objects.append(obj)
    if not masks:
        raise Skip("no_valid_masks")
    return image, np.stack(masks), kept, objects


def scene_dict(scene_id, image, masks, objects, refs=()):
    """The scene format of data.shapes / data.jsonl, with empty text where a format has none."""
    return {"id": scene_id, "image": image, "masks": masks, "boxes": boxes_from_masks(masks),
            "objects": objects, "refs": list(refs), "captions": [], "grounded": {"text": "", "spans": []}}

# ----------------------------------------------------------------------------- the COCO reader

def check_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found")


def load_json(path, what):
    """A JSON file, or a UserError naming it (missing, unreadable, not JSON)."""
    check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e}")


def check_dir(path, what):
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} does not exist (or is not a folder)")


def load_instances(path, skips):
    """Parse a COCO instances file -> (images {id: entry} in file order, annotations grouped by
    image id, category names by id). Annotations of unknown images are counted and dropped."""
    d = load_json(path, "COCO instances file")
    if not isinstance(d, dict) or not isinstance(d.get("images"), list) or not isinstance(d.get("annotations"), list):
        raise UserError(f"{path} is not a COCO instances file: it needs 'images' and 'annotations' lists")
    images = {}
    for im in d["images"]:
        try:
            assert isinstance(im["file_name"], str) and int(im["height"]) > 0 and int(im["width"]) > 0
            images[im["id"]] = im
        except (KeyError, TypeError, ValueError, AssertionError):
            skips.add("bad_image_entry", f"{str(im)[:60]} in {path}")
    anns = defaultdict(list)
    for a in d["annotations"]:
        if not isinstance(a, dict) or a.get("image_id") not in images:
            skips.add("ann_unknown_image", f"annotation {a.get('id') if isinstance(a, dict) else a!r} "
                                           f"(image_id {a.get('image_id') if isinstance(a, dict) else '?'}) in {path}")
            continue
        anns[a["image_id"]].append(a)
    cats = {c["id"]: str(c.get("name", c["id"])) for c in d.get("categories") or [] if isinstance(c, dict) and "id" in c}
    return images, anns, cats


def read_coco(instances, image_dir, skipped=None, split=None, max_masks=0, take=None):
    """Iterate the scenes of a COCO instances file, one per image with at least one usable
    mask. The files are checked right away (UserError); see the module docstring."""
    check_split(split)
    check_file(instances, "COCO instances file")       # both paths first, then the long parse
    check_dir(image_dir, "COCO image folder")
    skips = Skips(f"coco({instances})", skipped)
    images, anns, cats = load_instances(instances, skips)
    return _iter_coco(images, anns, cats, image_dir, skips, split, max_masks, take)


def _iter_coco(images, anns, cats, image_dir, skips, split, max_masks, take):
    try:
        for iid, im in images.items():
            if split and split_of(im["file_name"]) != split:
                continue                                # decided before anything is read
            if take is not None and not take():
                continue
            group = anns.get(iid)
            if not group:
                skips.add("no_annotations", im["file_name"])
                continue
            try:
                image, masks, _, objects = annotated_image(im, pick(group, max_masks, iid), image_dir, skips, cats)
            except Skip as e:
                skips.add(e.reason, im["file_name"])
                continue
            yield scene_dict(im["file_name"], image, masks, objects)
    finally:                                            # also when the consumer stops early
        skips.report()

# ----------------------------------------------------------------------------- synthetic fixture

def write_coco(out_dir, n, seed=0, quality=90):
    """A synthetic COCO-format dataset for tests and the self-test: n JPEG images of random
    sizes (96..160 px a side), each with 1-6 random star-shaped polygons painted on blocky noise.
    Annotations cycle through the three encodings: polygon, polygon, compressed RLE, crowd
    (uncompressed) RLE; the RLE masks are the polygons rasterised by polygon_mask. Writes
    out_dir/instances.json and out_dir/images/; returns the path of instances.json."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images, anns = [], []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(96, 161, 2))
        img = np.repeat(np.repeat(rng.integers(40, 200, (h // 8 + 1, w // 8 + 1, 3)), 8, 0), 8, 1)[:h, :w]
        img = img.astype(np.uint8)
        name = f"{i:012d}.jpg"
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for k in range(int(rng.integers(1, 7))):
            nv = int(rng.integers(5, 13))
            cx, cy, r = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h), rng.uniform(6, 0.3 * min(h, w))
            ang = np.sort(rng.uniform(0, 2 * np.pi, nv))
            rad = r * rng.uniform(0.5, 1.0, nv)
            xy = np.stack([np.clip(cx + rad * np.cos(ang), 0, w), np.clip(cy + rad * np.sin(ang), 0, h)], 1)
            poly = np.round(xy, 2).ravel().tolist()
            mask = polygon_mask([poly], h, w)
            if not mask.any():
                continue
            img[mask] = rng.integers(0, 256, 3)
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": nv, "iscrowd": 0,
                   "bbox": [], "area": int(mask.sum())}
            if k % 4 < 2:
                ann["segmentation"] = [poly]
            elif k % 4 == 2:
                ann["segmentation"] = {"size": [h, w], "counts": rle_to_string(rle_encode(mask)["counts"])}
            else:
                ann["segmentation"], ann["iscrowd"] = rle_encode(mask), 1
            anns.append(ann)
        Image.fromarray(img).save(os.path.join(out_dir, "images", name), quality=quality)
    path = os.path.join(out_dir, "instances.json")
    cats = [{"id": v, "name": f"{v}-gon"} for v in range(5, 13)]
    with open(path + ".tmp", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    os.replace(path + ".tmp", path)
    return path

# ----------------------------------------------------------------------------- memory self-test

def rss_mb():
    """Resident memory of this process now, in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def stream(instances, image_dir, n_images):
    """Stream a COCO fixture of n_images through data.open_dataset and print the resident memory
    as it goes: after imports, after the annotation index, at 10 / 50 / 100 % of the images, peak."""
    from data import open_dataset
    base = rss_mb()
    t0 = time.time()
    it = open_dataset(f"coco:{instances}:{image_dir}", Counter())
    after_index = rss_mb()
    marks = {max(1, n_images // 10): "10%", max(1, n_images // 2): "50%"}
    seen, n_masks, line = 0, 0, []
    for scene in it:
        seen += 1
        n_masks += len(scene["masks"])
        if seen in marks:
            line.append(f"{marks[seen]} {rss_mb():.0f} MB")
    line.append(f"100% {rss_mb():.0f} MB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"streamed {seen} images / {n_masks} masks in {time.time() - t0:.1f} s | RSS: after imports "
          f"{base:.0f} MB, after the annotation index {after_index:.0f} MB, " + ", ".join(line) +
          f" | peak RSS {peak:.0f} MB")


def main(argv):
    usage = "usage: python -m data.coco --selftest=N [--dir=out/coco_selftest]"
    args = {"selftest": None, "dir": "out/coco_selftest", "stream": None}
    for a in argv:
        key, eq, value = a.lstrip("-").partition("=")
        if a in ("-h", "--help"):
            print(usage)
            return 0
        if not a.startswith("--") or not eq or key not in args:
            print(f"error: bad argument {a!r}; {usage}", file=sys.stderr)
            return 2
        args[key] = value
    if args["stream"]:                   # the child process of --selftest: only the reading
        instances, image_dir, n = args["stream"].split(":")
        stream(instances, image_dir, int(n))
        return 0
    if not (args["selftest"] or "").isdigit() or int(args["selftest"]) < 1:
        print(f"error: --selftest takes a positive number of images; {usage}", file=sys.stderr)
        return 2
    n, out = int(args["selftest"]), args["dir"]
    t0 = time.time()
    path = write_coco(out, n)
    size = sum(e.stat().st_size for e in os.scandir(os.path.join(out, "images")))
    print(f"wrote {n} images ({size / 2 ** 20:.0f} MB of JPEG) and {path} "
          f"({os.path.getsize(path) / 2 ** 20:.1f} MB) in {time.time() - t0:.0f} s")
    # the reading runs in a fresh process, so that its peak RSS is the reader's alone
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.call([sys.executable, "-m", "data.coco", f"--stream={path}:{os.path.join(out, 'images')}:{n}"],
                           env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
