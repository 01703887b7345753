"""
Datasets for samtok: the embedded synthetic shapes world (data.shapes), the on-disk folder
format (data.jsonl), and readers of the real formats (data.coco, data.refcoco, data.sa1b),
all behind one door:

    from data import open_dataset
    for scene in open_dataset("coco:annotations/instances_val2017.json:val2017", split=None):
        scene["image"], scene["masks"], scene["refs"], ...

open_dataset(spec, skipped=None, split=None, max_masks=0, take=None) -> iterator of scene dicts, read one
image at a time. spec is one of

    shapes | shapes:SIZE                          the synthetic world (128 px unless SIZE)
    FOLDER | jsonl:FOLDER                         images + annotations.jsonl (data/jsonl.py)
    coco:INSTANCES_JSON:IMAGE_DIR                 COCO instances (polygons, RLE, compressed RLE)
    refcoco:REFS_PICKLE:INSTANCES_JSON:IMAGE_DIR  RefCOCO / RefCOCO+ / RefCOCOg (refs(unc).p, ...)
    grefcoco:GREFS_JSON:INSTANCES_JSON:IMAGE_DIR  gRefCOCO (multi-target and no-target phrases)
    sa1b:FOLDER                                   SA-1B per-image JSON + JPEG pairs

(refcoco+: and refcocog: are accepted as names for refcoco:.) Several specs joined by commas
are a mixture: one scene from each in turn until each runs out, e.g.
"refcoco:...,grefcoco:...". Every scene has the keys
    id        str (file name; the seed for shapes)   image  (H, W, 3) uint8
    masks     (N, H, W) bool, N >= 1                 boxes  (N, 4) float32 xyxy, tight, x2/y2 exclusive
    objects   list of N dicts (what the format knows: category, ann_id, ...; shapes: colour, shape, ...)
    refs      [{"text", "targets": [mask indices], "kind": "single" | "multi" | "none", ...}]
    captions  [] or one caption per mask          grounded  {"text", "spans": [[start, end, mask]]}
with empty refs / captions / grounded text where a format has none (COCO, SA-1B).

split: None = everything. shapes: train / val / test seed ranges (None = train). RefCOCO-style:
their own splits (train, val, testA, testB, test; "test" = every test*). The rest have no
splits, so train / val / test are 90 / 5 / 5 by a hash of the image name (data.coco.split_of),
decided before the image is read (a jsonl folder is filtered after reading). max_masks > 0 keeps
at most that many masks per image in the COCO-family and SA-1B readers (the referred ones
always, the others at random, seeded by the image): an SA-1B image has ~100.

take: a callable asked once per item of the split, in the reader's order, before its image is
read (a jsonl line is parsed first, for its image name's split); False passes over the item. data.stream shards a split over ranks and workers with it.

skipped: a collections.Counter that receives one count per skipped item and reason (missing or
corrupt image, bad mask, polygon with < 3 points, mask outside the image, unknown image id,
...); each reader also prints a summary with an example of each to stderr. What cannot be read
at all (a missing annotation file or folder, a file that does not parse, an unknown spec) raises
common.UserError naming the file and the problem, before the first scene.
"""
from data.shapes import COLORS, SHAPES, SPLITS, iter_scenes, make_scene, matches, scene_seeds

_JSONL_NAMES = ("rle_encode", "rle_decode", "write_folder", "read_folder", "boxes_from_masks", "load_rgb")


def __getattr__(name):
    # data.jsonl is imported lazily (PEP 562): importing it here eagerly would make
    # `python -m data.jsonl` warn that the module was already imported before running.
    if name in _JSONL_NAMES:
        from data import jsonl
        return getattr(jsonl, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def open_dataset(spec, skipped=None, split=None, max_masks=0, take=None):
    """The one way in to every dataset format; see the module docstring."""
    import os
    from collections import Counter
    from common import UserError
    skipped = Counter() if skipped is None else skipped
    if "," in spec:         # a mixture: every part is opened (and checked) now, read in turn
        if take is not None:
            raise ValueError("take is per part: open the parts of a mixture one by one (data.stream does)")
        return _interleave([open_dataset(part, skipped, split, max_masks) for part in spec.split(",")])
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []
    want = {"shapes": (0, 1), "jsonl": (1,), "coco": (2,), "refcoco": (3,), "refcoco+": (3,), "refcocog": (3,),
            "grefcoco": (3,), "sa1b": (1,)}
    if kind not in want:
        if os.path.isdir(spec):
            kind, args = "jsonl", [spec]
        else:
            raise UserError(f"--data={spec!r} is neither a dataset folder nor one of: shapes, shapes:SIZE, "
                            "jsonl:FOLDER, coco:INSTANCES_JSON:IMAGE_DIR, refcoco:REFS_PICKLE:INSTANCES_JSON:IMAGE_DIR, "
                            "grefcoco:GREFS_JSON:INSTANCES_JSON:IMAGE_DIR, sa1b:FOLDER")
    if len(args) not in want[kind]:
        raise UserError(f"--data={spec!r}: {kind} takes {max(want[kind])} colon-separated paths, got {len(args)}")
    if kind == "shapes":
        size = args[0] if args else "128"
        if not size.isdigit() or int(size) < 48:      # smaller worlds cannot place their shapes
            raise UserError(f"--data={spec!r}: the shapes world takes an image size >= 48 (shapes:SIZE)")
        if split not in (None, *SPLITS):
            raise UserError(f"the shapes world has splits {', '.join(SPLITS)}, not {split!r}")
        lo, hi = SPLITS[split or "train"]
        return (dict(make_scene(seed, int(size)), id=seed) for seed in range(lo, hi) if take is None or take())
    if kind == "jsonl":
        from data.coco import check_split
        from data.jsonl import read_folder
        check_split(split)
        try:
            return read_folder(args[0], skipped, split, take)
        except FileNotFoundError as e:
            raise UserError(str(e))
    if kind == "coco":
        from data.coco import read_coco
        return read_coco(*args, skipped=skipped, split=split, max_masks=max_masks, take=take)
    if kind == "sa1b":
        from data.sa1b import read_sa1b
        return read_sa1b(*args, skipped=skipped, split=split, max_masks=max_masks, take=take)
    from data.refcoco import read_grefcoco, read_refcoco
    reader = read_grefcoco if kind == "grefcoco" else read_refcoco
    return reader(*args, skipped=skipped, split=split, max_masks=max_masks, take=take)


def _interleave(iterators):
    """Round-robin over iterators, dropping each one as it runs out."""
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


__all__ = ["open_dataset", "COLORS", "SHAPES", "SPLITS", "iter_scenes", "make_scene", "matches", "scene_seeds",
           *_JSONL_NAMES]
