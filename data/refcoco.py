"""
Referring expressions on COCO images: RefCOCO / RefCOCO+ / RefCOCOg and gRefCOCO -> scenes.

These are the data of the paper's referring and generalized segmentation tasks (PAPER.md
section 3): a phrase, and the masks it refers to - one (RefCOCO), or zero, one or many
(gRefCOCO, "GRES"). Both come as an expression file next to a COCO instances file:

    refcoco/refs(unc).p + refcoco/instances.json        (refcoco+, refcocog(umd) the same)
        a pickle: a list of {"ref_id", "image_id", "ann_id", "split", "category_id",
                             "sentences": [{"sent": "man on the left", ...}, ...]}
    grefcoco/grefs(unc).json + grefcoco/instances.json
        JSON: the same, but "ann_id" is a list and "no_target": true marks an expression that
        matches nothing in the image (its ann_id is [-1])

Each image with at least one usable expression becomes one scene (data/coco.py's format):
all the image's annotated objects as masks (so the tokenizer sees them too), and one ref per
sentence: {"text", "targets": indices into masks, "kind": "single" | "multi" | "none",
"ref_id", "split"}. The splits are the datasets' own (train, val, testA, testB, test);
split="test" takes every test* split.

The refs pickle was written by Python 2; it is read with an unpickler that refuses any class
(a pickle can otherwise run code): only lists, dicts, strings and numbers pass.

Bad expressions are counted, never fatal: an unknown image id (ref_unknown_image), an ann_id
not in that image (ref_unknown_ann), a target whose mask could not be decoded (ref_dropped), a
no_target flag that contradicts the ann_id list (ref_inconsistent), a malformed entry
(malformed_ref).
"""
import os
import pickle
from collections import defaultdict

from common import UserError
from data.coco import Skip, Skips, annotated_image, check_dir, check_file, load_instances, load_json, pick, scene_dict


class _DataOnly(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it references {module}.{name}; a refs file holds only lists, dicts and strings")


def load_refs_pickle(path):
    if not os.path.isfile(path):
        raise UserError(f"RefCOCO refs file {path} not found")
    try:
        with open(path, "rb") as f:
            refs = _DataOnly(f, encoding="latin1").load()     # Python 2 str -> str
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path} is not a RefCOCO refs pickle: {e}")
    if not isinstance(refs, list):
        raise UserError(f"{path} is not a RefCOCO refs pickle: it holds a {type(refs).__name__}, not a list of refs")
    return refs


def _normalise(ref, grefs):
    """One entry of a refs file -> (image_id, ann_ids, no_target, sentences, split, ref_id);
    raises Skip for a malformed or self-contradicting entry."""
    try:
        ann = ref["ann_id"]
        ann_ids = [int(a) for a in (ann if isinstance(ann, list) else [ann])]
        sents = [str(s["sent"] if isinstance(s, dict) else s) for s in ref["sentences"]]
        out = (ref["image_id"], ann_ids, bool(ref.get("no_target", False)) if grefs else False,
               sents, str(ref.get("split", "")), ref.get("ref_id"))
    except (KeyError, TypeError, ValueError):
        raise Skip("malformed_ref")
    real = [a for a in ann_ids if a >= 0]             # gRefCOCO writes "no target" as [-1]
    if out[2] != (not real):
        raise Skip("ref_inconsistent")
    if not sents:
        raise Skip("malformed_ref")
    return out[0], real, out[2], sents, out[4], out[5]


def _in_split(ref_split, split):
    return split is None or ref_split == split or (split == "test" and ref_split.startswith("test"))


def read_refcoco(refs_path, instances, image_dir, skipped=None, split=None, max_masks=0, take=None):
    """RefCOCO / RefCOCO+ / RefCOCOg: refs pickle + COCO instances + image folder -> scenes."""
    check_file(instances, "COCO instances file")
    check_dir(image_dir, "COCO image folder")
    refs = load_refs_pickle(refs_path)
    return _read_referring(refs, refs_path, instances, image_dir, skipped, split, max_masks, grefs=False, take=take)


def read_grefcoco(grefs_path, instances, image_dir, skipped=None, split=None, max_masks=0, take=None):
    """gRefCOCO: grefs JSON (multi-target and no-target expressions) + instances + images -> scenes."""
    check_file(instances, "COCO instances file")
    check_dir(image_dir, "COCO image folder")
    refs = load_json(grefs_path, "gRefCOCO refs file")
    if not isinstance(refs, list):
        raise UserError(f"{grefs_path} is not a gRefCOCO refs file: it holds a {type(refs).__name__}, not a list")
    return _read_referring(refs, grefs_path, instances, image_dir, skipped, split, max_masks, grefs=True, take=take)


def _read_referring(refs, refs_path, instances, image_dir, skipped, split, max_masks, grefs, take=None):
    skips = Skips(f"{'grefcoco' if grefs else 'refcoco'}({refs_path})", skipped)
    images, anns, cats = load_instances(instances, skips)
    # the expressions of each image, in file order (the annotation index is already in memory)
    by_image = defaultdict(list)
    for k, ref in enumerate(refs):
        where = f"ref {ref.get('ref_id', k) if isinstance(ref, dict) else k} in {refs_path}"
        try:
            image_id, ann_ids, no_target, sents, ref_split, ref_id = _normalise(ref, grefs)
            if not _in_split(ref_split, split):
                continue
            if image_id not in images:
                raise Skip("ref_unknown_image")
            known = {a["id"] for a in anns.get(image_id, [])}
            if not set(ann_ids) <= known:
                raise Skip("ref_unknown_ann")
        except Skip as e:
            skips.add(e.reason, where)
            continue
        by_image[image_id].append((ann_ids, no_target, sents, ref_split, ref_id, where))
    return _iter_referring(by_image, images, anns, cats, image_dir, skips, max_masks, take)


def _iter_referring(by_image, images, anns, cats, image_dir, skips, max_masks, take):
    try:
        for image_id, group in by_image.items():
            if take is not None and not take():
                continue
            im = images[image_id]
            referred = {a for ann_ids, *_ in group for a in ann_ids}
            try:
                image, masks, kept, objects = annotated_image(
                    im, pick(anns[image_id], max_masks, image_id, keep=referred), image_dir, skips, cats)
            except Skip as e:
                skips.add(e.reason, im["file_name"])
                continue
            index = {a["id"]: i for i, a in enumerate(kept)}
            refs = []
            for ann_ids, no_target, sents, ref_split, ref_id, where in group:
                if not all(a in index for a in ann_ids):
                    skips.add("ref_dropped", where)          # a target's mask was unusable
                    continue
                targets = [index[a] for a in ann_ids]
                kind = "none" if no_target else ("single" if len(targets) == 1 else "multi")
                refs += [{"text": s, "targets": targets, "kind": kind, "ref_id": ref_id, "split": ref_split}
                         for s in sents]
            if not refs:
                skips.add("no_valid_refs", im["file_name"])
                continue
            yield scene_dict(im["file_name"], image, masks, objects, refs)
    finally:
        skips.report()
