"""
SA-1B (Segment Anything 1B): a folder of per-image JSON + JPEG pairs -> scenes.

SA-1B is most of the paper's tokenizer data (200M of its 209M masks). Each tar unpacks to

    sa_000000/sa_1.jpg  sa_000000/sa_1.json  sa_000000/sa_2.jpg ...
    sa_1.json = {"image": {"image_id": 1, "file_name": "sa_1.jpg", "height": 1500, "width": 2250},
                 "annotations": [{"id": ..., "segmentation": {"size": [1500, 2250], "counts": "..."},
                                  "predicted_iou": 0.93, "stability_score": 0.97, ...}, ...]}

with masks as compressed RLE (data/coco.py decodes them). Each image becomes one scene with
objects [{ann_id, predicted_iou, stability_score}] and no text (refs / captions empty).

FOLDER may be one unpacked tar or the folder holding all of them (one level of subfolders).
Streaming: a folder's listing is read (names only) when reached, then one JSON and one JPEG
at a time.
An SA-1B image has ~100 masks at ~1500 x 2250: ~340 MB of bool masks for one scene, so pass
max_masks (a random subset per image, seeded by the image) when the consumer samples a few
masks per image anyway (the tokenizer's masks_per_image).

Skipped and counted: a JSON that does not parse or lacks "image" / "annotations" (bad_json),
a missing or corrupt image, an image of another size than its JSON says, bad masks (see
data/coco.py). A missing folder is fatal (UserError).
"""
import json
import os

from data.coco import Skip, Skips, annotated_image, check_dir, check_split, pick, scene_dict, split_of


def read_sa1b(folder, skipped=None, split=None, max_masks=0, take=None):
    """Iterate the scenes of an SA-1B folder: its JSON files in name order, then those of its
    subfolders (sa_000000/, sa_000001/, ... as the tars unpack), each listed when reached."""
    check_split(split)
    check_dir(folder, "SA-1B folder")
    return _iter_sa1b(folder, Skips(f"sa1b({folder})", skipped), split, max_masks, take)


def _json_files(folder):
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    yield from ((folder, e.name) for e in entries if e.name.endswith(".json") and e.is_file())
    for sub in (e.path for e in entries if e.is_dir()):
        yield from ((sub, n) for n in sorted(x.name for x in os.scandir(sub) if x.name.endswith(".json") and x.is_file()))


def _iter_sa1b(root, skips, split, max_masks, take):
    try:
        for folder, name in _json_files(root):
            if split and split_of(name) != split:
                continue
            if take is not None and not take():
                continue
            try:
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        rec = json.load(f)
                    info, anns = rec["image"], rec["annotations"]
                    im = {"file_name": info.get("file_name") or name[:-5] + ".jpg",
                          "height": int(info["height"]), "width": int(info["width"])}
                    assert isinstance(anns, list) and all(isinstance(a, dict) for a in anns)
                except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError, AssertionError):
                    raise Skip("bad_json")
                anns = pick(anns, max_masks, name)
                image, masks, kept, _ = annotated_image(im, anns, folder, skips)
            except Skip as e:
                skips.add(e.reason, os.path.join(folder, name))
                continue
            objects = [{k: a[k] for k in ("id", "predicted_iou", "stability_score") if k in a} for a in kept]
            for o in objects:
                o["ann_id"] = o.pop("id", None)
            yield scene_dict(im["file_name"], image, masks, objects)
    finally:
        skips.report()
