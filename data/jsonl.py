"""
The on-disk dataset format: a folder of images plus one `annotations.jsonl`.

    folder/
      annotations.jsonl     one JSON object per line, one line per image
      images/123.png        any path relative to the folder, any format PIL reads

Each line looks like

    {"image": "images/123.png",
     "masks": [{"size": [H, W], "counts": [...]}, ...],      # required: RLE, see below
     "refs": [...], "captions": [...], "grounded": {...},     # optional, as in data.shapes
     "objects": [...]}                                        # optional

Masks are stored as uncompressed COCO-style run-length encodings: the mask is read
in column-major (Fortran) order and `counts` alternates run lengths of 0s and 1s,
always starting with the 0s (so a mask whose first pixel is set starts with 0).
Boxes are never stored: they are recomputed from the masks, so they cannot disagree.

The reader is meant for data we did not make ourselves, so it is defensive: a broken
image, a malformed line, an undecodable/empty/wrong-size mask is skipped and COUNTED
in a Counter of reasons (and summarised on stderr), never silently dropped.

Command line (writes the synthetic shapes world in this format):

    python -m data.jsonl --out=out/data --split=val --n=64 [--size=128]
"""
import json
import os
import sys
from collections import Counter

import numpy as np
from PIL import Image

from data.shapes import SPLITS, iter_scenes, scene_seeds

# ----------------------------------------------------------------------------- RLE

def rle_encode(mask):
    """bool (H, W) -> {"size": [H, W], "counts": [n0, n1, n0, ...]} (column-major runs)."""
    mask = np.asarray(mask, bool)
    flat = mask.ravel(order="F")
    # indices where the value changes, plus both ends, give the run boundaries
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts          # runs always start with the 0s, possibly an empty run
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle):
    """Inverse of rle_encode. Raises ValueError if the counts do not tile the mask exactly."""
    h, w = (int(x) for x in rle["size"])
    counts = np.asarray(rle["counts"], np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()} but size {h}x{w} needs {h * w}")
    values = np.arange(len(counts)) % 2 == 1        # 0s, 1s, 0s, ...
    return np.repeat(values, counts).reshape((h, w), order="F")

# ----------------------------------------------------------------------------- writer

def write_folder(out_dir, split, n, size=128):
    """Write the first n scenes of a synthetic split to out_dir; returns the jsonl path."""
    scene_seeds(split, n)            # validate split and n before creating anything on disk
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "annotations.jsonl")
    # write to a temporary name and rename at the end, so an interrupted export never
    # leaves a half-written annotations.jsonl that looks complete
    try:
        with open(path + ".tmp", "w") as f:
            for seed, scene in iter_scenes(split, n, size):
                rel = f"images/{seed}.png"
                Image.fromarray(scene["image"]).save(os.path.join(out_dir, rel))
                record = {"image": rel, "seed": seed, "masks": [rle_encode(m) for m in scene["masks"]]}
                for key in ("objects", "refs", "captions", "grounded"):
                    record[key] = scene[key]
                f.write(json.dumps(record) + "\n")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):          # interrupted: leave no half-written file
            os.remove(path + ".tmp")
    return path

# ----------------------------------------------------------------------------- reader

def load_rgb(path):
    """Any image PIL can read -> uint8 (H, W, 3). Raises OSError if unreadable/truncated."""
    with Image.open(path) as img:
        img.load()                        # decode now: truncated files fail here, not later
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16/32-bit greyscale: PIL's convert("RGB") would clip at 255, so rescale
            # ourselves (16-bit full range / 257 maps 65535 -> 255). A 16-bit file is always
            # on the 16-bit scale, even a dark one; 32-bit "I"/"F" images carry no scale, so
            # those are taken as 16-bit only when a value exceeds 255.
            arr = np.asarray(img, np.float64)
            if img.mode.startswith("I;16") or arr.max() > 255:
                arr = arr / 257
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
            return np.repeat(arr[:, :, None], 3, axis=2)
        # palette, greyscale, RGBA (alpha dropped), CMYK, ... -> plain 8-bit RGB
        return np.array(img.convert("RGB"), np.uint8)      # a writable array (torch will not wrap a read-only one)


def read_folder(folder, skipped=None, split=None, take=None):
    """Iterate scene dicts (same keys as data.shapes.make_scene, plus "id") from a folder.

    `skipped` (a collections.Counter, optional) receives one count per skipped item and
    reason; a summary line goes to stderr at the end whenever anything was skipped.
    The folder and its annotations.jsonl are checked right away (FileNotFoundError).
    split: only the lines whose image name hashes to it (data.coco.split_of), decided before
    the image is read; take: see data.open_dataset (asked after the split, before the image).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder {folder!r} does not exist "
                                f"(expected a folder holding annotations.jsonl and the images)")
    path = os.path.join(folder, "annotations.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: a dataset folder needs annotations.jsonl, "
                                f"one JSON object per line with at least 'image' and 'masks'")
    return _iter_folder(folder, path, Counter() if skipped is None else skipped, split, take)


def _iter_folder(folder, path, skipped, split, take):
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue                           # blank lines are harmless, not errors
            scene = _read_record(folder, line, skipped, split, take)
            if scene is not None:
                yield scene
    if skipped:
        details = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        print(f"read_folder({folder}): skipped {details}", file=sys.stderr)


def _read_record(folder, line, skipped, split=None, take=None):
    """One jsonl line -> scene dict, or None (with the reason counted in `skipped`, unless the
    line belongs to another split)."""
    try:
        rec = json.loads(line)
        image_rel, rles = rec["image"], list(rec["masks"])
        assert isinstance(image_rel, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        skipped["malformed_line"] += 1
        return None
    if split is not None:
        from data.coco import split_of
        if split_of(image_rel) != split:
            return None
    if take is not None and not take():
        return None                                # another shard's: its image is not read
    image_path = os.path.join(folder, image_rel)
    if not os.path.isfile(image_path):
        skipped["missing_image"] += 1
        return None
    try:
        image = load_rgb(image_path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # what PIL raises
        skipped["unreadable_image"] += 1
        return None
    # decode the masks, dropping the bad ones but keeping track of which survive (`keep`)
    # so that refs / captions / grounded spans can be renumbered consistently
    masks, keep = [], []
    for i, rle in enumerate(rles):
        try:
            m = rle_decode(rle)
        except (ValueError, KeyError, TypeError):
            skipped["bad_rle_mask"] += 1
            continue
        if m.shape != image.shape[:2]:
            skipped["mask_size_mismatch"] += 1
            continue
        if not m.any():
            skipped["empty_mask"] += 1
            continue
        masks.append(m)
        keep.append(i)
    if not masks:
        skipped["no_valid_masks"] += 1
        return None
    masks = np.stack(masks)
    scene = {"id": image_rel, "image": image, "masks": masks, "boxes": boxes_from_masks(masks)}
    _carry_text(rec, keep, len(rles), scene, skipped)
    return scene


def _carry_text(rec, keep, n_old, scene, skipped):
    """Copy the optional text annotations, renumbered to the surviving masks.

    Anything that does not fit (wrong length, a ref to a dropped mask, bad spans) is
    dropped and counted; the masks themselves are kept regardless.
    """
    new_index = {old: new for new, old in enumerate(keep)}
    for key in ("objects", "captions"):            # per-mask lists: keep the survivors
        if key in rec:
            if isinstance(rec[key], list) and len(rec[key]) == n_old:
                scene[key] = [rec[key][i] for i in keep]
            else:
                skipped[f"{key}_dropped"] += 1
    if "refs" in rec:
        scene["refs"] = []
        for ref in rec["refs"] if isinstance(rec["refs"], list) else []:
            targets = ref.get("targets") if isinstance(ref, dict) else None
            if not isinstance(targets, list) or not all(t in new_index for t in targets):
                skipped["ref_dropped"] += 1        # malformed, or points at a dropped mask
                continue
            scene["refs"].append({**ref, "targets": [new_index[t] for t in targets]})
    if "grounded" in rec:
        try:
            g = rec["grounded"]
            spans = [[int(s), int(e), new_index[i]] for s, e, i in g["spans"] if i in new_index]
            scene["grounded"] = {"text": str(g["text"]), "spans": spans}
        except (KeyError, TypeError, ValueError):
            skipped["grounded_dropped"] += 1


def boxes_from_masks(masks):
    """Tight xyxy boxes (x2, y2 exclusive) of non-empty masks (N, H, W) -> float32 (N, 4)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes[k] = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    return boxes

# ----------------------------------------------------------------------------- command line

USAGE = "usage: python -m data.jsonl --out=DIR --split={" + ",".join(SPLITS) + "} --n=N [--size=128]"


def main(argv):
    args = {"out": "out/data", "split": "val", "n": "64", "size": "128"}
    for a in argv:
        if a in ("-h", "--help"):
            print(USAGE)
            return 0
        key, eq, value = a.lstrip("-").partition("=")
        if not a.startswith("--") or not eq or key not in args:
            print(f"error: bad argument {a!r}; {USAGE}", file=sys.stderr)
            return 2
        args[key] = value
    try:
        if not (args["n"].isdigit() and args["size"].isdigit()):
            raise ValueError(f"--n and --size must be non-negative integers, "
                             f"got --n={args['n']} --size={args['size']}")
        n, size = int(args["n"]), int(args["size"])
        if size < 16:
            raise ValueError(f"--size={size} is too small (need >= 16)")
        path = write_folder(args["out"], args["split"], n, size)   # ValueError on bad split/n
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(path) as f:
        n_masks = sum(len(json.loads(line)["masks"]) for line in f)
    print(f"wrote {n} scenes with {n_masks} masks ({args['split']} split, {size}x{size}) "
          f"to {path} (images in {os.path.join(args['out'], 'images')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
