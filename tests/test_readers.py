"""The real-data readers (data/coco.py, refcoco.py, sa1b.py) and data.open_dataset.

Every test writes a tiny fixture folder in the format (a few images of a few dozen pixels), reads
it back and checks each mask, reference and skip count against what was written. The compressed
RLE codec and the polygon rasteriser are checked against values computed with pycocotools (the
reference implementation; not a dependency: its outputs are pasted below).
"""
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import UserError  # noqa: E402
from data import iter_scenes, open_dataset  # noqa: E402
from data.coco import polygon_mask, rle_from_string, rle_to_string, split_of, write_coco  # noqa: E402
from data.jsonl import boxes_from_masks, rle_decode, rle_encode, write_folder  # noqa: E402

# ---------------------------------------------------------------- codec and rasteriser

def test_compressed_rle_matches_pycocotools():
    # pycocotools.mask.encode of this 9x11 mask gives b'01l04XO00MM0330000?L'
    m = np.zeros((9, 11), bool)
    m[2:7, 3:9] = True
    m[4, 5] = False
    m[0, 0] = m[8, 10] = True
    golden = "01l04XO00MM0330000?L"
    assert rle_to_string(rle_encode(m)["counts"]) == golden
    assert np.array_equal(rle_decode({"size": [9, 11], "counts": rle_from_string(golden)}), m)
    rng = np.random.default_rng(0)                       # long runs: multi-character numbers, negative deltas
    for shape, p in [((300, 400), 0.5), ((57, 3), 0.05), ((1, 1), 1.0), ((40, 60), 0.0)]:
        m = rng.random(shape) < p
        m[: shape[0] // 2, : shape[1] // 3] = True
        counts = rle_encode(m)["counts"]
        assert rle_from_string(rle_to_string(counts)) == counts
    for bad in ("0a\x7f", "0`"):                         # a non-RLE character; a number cut short
        with pytest.raises(ValueError):
            rle_from_string(bad)


def test_polygon_rasteriser():
    # pixel (i, j) covers [j, j+1) x [i, i+1): an integer rectangle is exactly its pixels
    m = polygon_mask([[2, 3, 12, 3, 12, 9, 2, 9]], 20, 30)
    want = np.zeros((20, 30), bool)
    want[3:9, 2:12] = True
    assert np.array_equal(m, want)
    # parts are united; a polygon wider than the image is clipped at its border
    m = polygon_mask([[0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 40, 10, 40, 12, 10, 12]], 20, 30)
    assert m[:4, :4].all() and m[10:12, 10:].all() and m.sum() == 16 + 2 * 20
    # pycocotools.mask.frPyObjects of this pentagon at 64x72 (area 2014), as compressed RLE
    poly = [10.5, 4.0, 60.25, 12.0, 52.0, 47.5, 30.0, 58.0, 6.0, 33.0]
    ref = rle_decode({"size": [64, 72], "counts": rle_from_string(
        "n<3f18I8H7I7N2O1O100O1O1O1O1O100O1O1O1O1O100O1O1O1O1OO2O0O100O100O101N10000O100O2O0O100O100O2O0"
        "M3L4L4K5L5K4K5Lhg0")})
    ours = polygon_mask([poly], 64, 72)
    assert ref.sum() == 2014
    assert (ref & ours).sum() / (ref | ours).sum() > 0.95 and abs(int(ours.sum()) - 2014) < 40

# ---------------------------------------------------------------- COCO

def save_png(path, h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)
    return img


def disc(h, w, cy, cx, r):
    y, x = np.mgrid[:h, :w]
    return (y + 0.5 - cy) ** 2 + (x + 0.5 - cx) ** 2 < r * r


@pytest.fixture
def coco(tmp_path):
    """One good image with every kind of segmentation and every kind of bad annotation, plus
    images that are missing, corrupt, of the wrong size, or without annotations."""
    d = tmp_path
    img = save_png(str(d / "img" / "a.png"), 20, 30, 0)
    save_png(str(d / "img" / "c.png"), 20, 30, 1)
    (d / "img" / "c.png").write_bytes((d / "img" / "c.png").read_bytes()[:60])        # truncated
    save_png(str(d / "img" / "e.png"), 21, 30, 2)                                       # JSON says 20x30
    save_png(str(d / "img" / "d.png"), 20, 30, 3)
    rect = np.zeros((20, 30), bool)
    rect[3:9, 2:12] = True
    ring = disc(20, 30, 12, 18, 6) & ~disc(20, 30, 12, 18, 3)
    crowd = disc(20, 30, 15, 5, 4)
    images = [{"id": i, "file_name": f, "height": 20, "width": 30} for i, f in
              [(1, "a.png"), (2, "b.png"), (3, "c.png"), (4, "d.png"), (5, "e.png")]]
    ok = {"image_id": 1, "category_id": 7, "iscrowd": 0}
    anns = [
        {**ok, "id": 10, "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]]},                                    # polygon
        {**ok, "id": 11, "segmentation": {"size": [20, 30], "counts": rle_to_string(rle_encode(ring)["counts"])}},
        {**ok, "id": 12, "iscrowd": 1, "segmentation": rle_encode(crowd)},                                 # crowd RLE
        {**ok, "id": 13, "segmentation": [[1, 1, 5, 5]]},                                    # 2 points only
        {**ok, "id": 14, "segmentation": [[20, 0, 22, 0], [25, 1, 29, 1, 29, 4, 25, 4]]},    # 1 of 2 parts ok
        {**ok, "id": 15, "segmentation": [[25, 10, 45, 10, 45, 15, 25, 15]]},                # past the border
        {**ok, "id": 16, "segmentation": rle_encode(np.ones((10, 10), bool))},               # another size
        {**ok, "id": 17, "segmentation": {"size": [20, 30], "counts": [5, 5]}},              # does not tile
        {**ok, "id": 18, "image_id": 999, "segmentation": [[0, 0, 3, 0, 3, 3]]},             # unknown image
        {**ok, "id": 19, "segmentation": [[0, 0, 1, "x", 2, 2]]},                            # not numbers
    ] + [{**ok, "id": 20 + i, "image_id": i, "segmentation": [[0, 0, 9, 0, 9, 9]]} for i in (2, 3, 5)]
    cats = [{"id": 7, "name": "widget"}]
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    part2 = np.zeros((20, 30), bool)
    part2[1:4, 25:29] = True
    return d, img, [rect, ring, crowd, part2]


def test_coco_reader(coco, capsys):
    d, img, want = coco
    skipped = Counter()
    got = list(open_dataset(f"coco:{d / 'instances.json'}:{d / 'img'}", skipped))
    assert len(got) == 1
    s = got[0]
    assert s["id"] == "a.png" and np.array_equal(s["image"], img)
    assert s["masks"].dtype == bool and s["masks"].shape == (4, 20, 30)
    for m, w in zip(s["masks"], want):
        assert np.array_equal(m, w)
    assert np.array_equal(s["boxes"], boxes_from_masks(s["masks"])) and s["boxes"][0].tolist() == [2, 3, 12, 9]
    assert [o["ann_id"] for o in s["objects"]] == [10, 11, 12, 14]
    assert [o["iscrowd"] for o in s["objects"]] == [0, 0, 1, 0] and s["objects"][0]["category"] == "widget"
    assert s["refs"] == [] and s["captions"] == [] and s["grounded"] == {"text": "", "spans": []}
    assert skipped == Counter(polygon_too_few_points=1, polygon_part_too_few_points=1, mask_outside_image=1,
                              mask_size_mismatch=1, bad_rle=1, ann_unknown_image=1, bad_polygon=1,
                              missing_image=1, unreadable_image=1, image_size_mismatch=1, no_annotations=1)
    err = capsys.readouterr().err
    assert "mask_outside_image=1 (e.g. annotation 15 of a.png)" in err and "missing_image=1 (e.g. b.png)" in err


def test_coco_fatal_errors(coco, tmp_path):
    d = coco[0]
    with pytest.raises(UserError, match="nowhere.json not found"):
        open_dataset(f"coco:{d / 'nowhere.json'}:{d / 'img'}")
    with pytest.raises(UserError, match="noimg does not exist"):
        open_dataset(f"coco:{d / 'instances.json'}:{d / 'noimg'}")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(UserError, match="broken.json is not valid JSON"):
        open_dataset(f"coco:{tmp_path / 'broken.json'}:{d / 'img'}")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a COCO instances file"):
        open_dataset(f"coco:{tmp_path / 'list.json'}:{d / 'img'}")


def test_coco_writer_round_trip_splits_and_cap(tmp_path):
    path = write_coco(str(tmp_path), 12, seed=1)
    rec = json.load(open(path))
    kinds = Counter("polygon" if isinstance(a["segmentation"], list) else
                    ("string" if isinstance(a["segmentation"]["counts"], str) else "counts") for a in rec["annotations"])
    assert set(kinds) == {"polygon", "string", "counts"}
    skipped = Counter()
    spec = f"coco:{path}:{tmp_path / 'images'}"
    scenes = list(open_dataset(spec, skipped))
    assert len(scenes) == 12 and not skipped
    anns = {a["id"]: a for a in rec["annotations"]}
    for s, im in zip(scenes, rec["images"]):
        assert s["id"] == im["file_name"] and s["image"].shape == (im["height"], im["width"], 3)
        for m, o in zip(s["masks"], s["objects"]):
            a = anns[o["ann_id"]]
            poly = a["segmentation"] if isinstance(a["segmentation"], list) else None
            if poly is None:     # an RLE: the writer rasterised the polygon it drew; compare with the area
                assert m.sum() == a["area"]
            else:
                assert np.array_equal(m, polygon_mask(poly, im["height"], im["width"]))
            assert o["category"] == f"{a['category_id']}-gon"
    # the 90/5/5 hash split: disjoint, complete, decided by the name
    parts = {sp: [s["id"] for s in open_dataset(spec, split=sp)] for sp in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == sorted(s["id"] for s in scenes)
    assert all(split_of(i) == sp for sp, ids in parts.items() for i in ids)
    with pytest.raises(UserError, match="train, val or test"):
        open_dataset(spec, split="testA")
    # at most 2 masks per image, the same 2 every time
    a = [s["objects"] for s in open_dataset(spec, max_masks=2)]
    b = [s["objects"] for s in open_dataset(spec, max_masks=2)]
    assert a == b and max(map(len, a)) == 2 and sum(map(len, a)) < sum(len(s["masks"]) for s in scenes)


def test_coco_selftest_pieces(tmp_path, capsys):
    """The parts of `python -m data.coco --selftest=N` (which runs them in two processes)."""
    from data.coco import main, stream
    path = write_coco(str(tmp_path), 10)
    stream(path, str(tmp_path / "images"), 10)
    out = capsys.readouterr()
    assert "streamed 10 images" in out.out and "peak RSS" in out.out and "skipped" not in out.err
    assert main(["--selftest=many"]) == 2 and main(["--bogus=1"]) == 2
    assert capsys.readouterr().err.count("error:") == 2


# ---------------------------------------------------------------- RefCOCO and gRefCOCO

@pytest.fixture
def referring(tmp_path):
    """Three images; image 3's only referred object has a broken polygon."""
    d = tmp_path
    for i in (1, 2, 3):
        save_png(str(d / "img" / f"COCO_train2014_{i:012d}.jpg".replace(".jpg", ".png")), 16, 24, i)
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.png", "height": 16, "width": 24} for i in (1, 2, 3)]
    box = lambda x0, y0, x1, y1: [[x0, y0, x1, y0, x1, y1, x0, y1]]
    anns = [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": box(1, 1, 8, 8)},
            {"id": 12, "image_id": 1, "category_id": 2, "segmentation": box(12, 2, 20, 10)},
            {"id": 13, "image_id": 1, "category_id": 1, "segmentation": box(2, 10, 6, 15)},
            {"id": 21, "image_id": 2, "category_id": 1, "segmentation": box(0, 0, 24, 16)},
            {"id": 31, "image_id": 3, "category_id": 1, "segmentation": [[1, 1, 2, 2]]},
            {"id": 32, "image_id": 3, "category_id": 1, "segmentation": box(3, 3, 9, 9)}]
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return d


def test_refcoco_reader(referring, capsys):
    d = referring
    sent = lambda *xs: [{"sent": x, "raw": x.upper(), "tokens": x.split(), "sent_id": 0} for x in xs]
    refs = [{"ref_id": 1, "image_id": 1, "ann_id": 11, "split": "train", "category_id": 1, "sentences": sent("left man", "man on the left")},
            {"ref_id": 2, "image_id": 1, "ann_id": 12, "split": "val", "category_id": 2, "sentences": sent("the dog")},
            {"ref_id": 3, "image_id": 2, "ann_id": 21, "split": "testA", "category_id": 1, "sentences": sent("everyone")},
            {"ref_id": 4, "image_id": 99, "ann_id": 11, "split": "train", "sentences": sent("ghost")},
            {"ref_id": 5, "image_id": 2, "ann_id": 11, "split": "train", "sentences": sent("wrong image")},
            {"ref_id": 6, "image_id": 3, "ann_id": 31, "split": "train", "sentences": sent("broken")},
            {"ref_id": 7, "image_id": 1, "ann_id": 12, "split": "train"}]                  # no sentences
    with open(d / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)                                             # as Python 2 wrote it
    spec = f"refcoco:{d / 'refs(unc).p'}:{d / 'instances.json'}:{d / 'img'}"
    skipped = Counter()
    scenes = list(open_dataset(spec, skipped))
    assert [s["id"] for s in scenes] == ["COCO_train2014_000000000001.png", "COCO_train2014_000000000002.png"]
    s = scenes[0]
    assert len(s["masks"]) == 3 and [o["category"] for o in s["objects"]] == ["person", "dog", "person"]
    assert [(r["text"], r["targets"], r["kind"], r["split"]) for r in s["refs"]] == [
        ("left man", [0], "single", "train"), ("man on the left", [0], "single", "train"), ("the dog", [1], "single", "val")]
    assert s["boxes"][1].tolist() == [12, 2, 20, 10] and s["masks"][0][1:8, 1:8].all()
    assert skipped == Counter(ref_unknown_image=1, ref_unknown_ann=1, ref_dropped=1, polygon_too_few_points=1,
                              no_valid_refs=1, malformed_ref=1)
    assert "ref_unknown_image=1 (e.g. ref 4 in" in capsys.readouterr().err
    # the datasets' own splits; "test" takes testA / testB
    assert [[r["text"] for r in s["refs"]] for s in open_dataset(spec, split="val")] == [["the dog"]]
    assert [s["id"][-5] for s in open_dataset(spec, split="test")] == ["2"]
    # max_masks keeps the referred masks
    capped = next(open_dataset(spec, split="val", max_masks=1))
    assert len(capped["masks"]) == 1 and capped["objects"][0]["ann_id"] == 12 and capped["refs"][0]["targets"] == [0]
    # a pickle that names a class is refused before it can run anything
    with open(d / "evil.p", "wb") as f:
        pickle.dump([Counter(a=1)], f)
    with pytest.raises(UserError, match=r"evil.p is not a RefCOCO refs pickle: .*references collections.Counter"):
        open_dataset(f"refcoco:{d / 'evil.p'}:{d / 'instances.json'}:{d / 'img'}")
    with pytest.raises(UserError, match="refs file .*nope.p not found"):
        open_dataset(f"refcocog:{d / 'nope.p'}:{d / 'instances.json'}:{d / 'img'}")


def test_grefcoco_reader(referring):
    d = referring
    s = lambda *xs: [{"sent": x} for x in xs]
    grefs = [{"ref_id": 1, "image_id": 1, "ann_id": [11, 13], "no_target": False, "split": "train", "sentences": s("both people")},
             {"ref_id": 2, "image_id": 1, "ann_id": [-1], "no_target": True, "split": "train", "sentences": s("the cat", "a horse")},
             {"ref_id": 3, "image_id": 1, "ann_id": [12], "no_target": False, "split": "train", "sentences": s("dog")},
             {"ref_id": 4, "image_id": 1, "ann_id": [-1], "no_target": False, "split": "train", "sentences": s("x")},
             {"ref_id": 5, "image_id": 1, "ann_id": [11], "no_target": True, "split": "train", "sentences": s("y")}]
    (d / "grefs(unc).json").write_text(json.dumps(grefs))
    skipped = Counter()
    scenes = list(open_dataset(f"grefcoco:{d / 'grefs(unc).json'}:{d / 'instances.json'}:{d / 'img'}", skipped))
    assert len(scenes) == 1
    assert [(r["text"], r["targets"], r["kind"]) for r in scenes[0]["refs"]] == [
        ("both people", [0, 2], "multi"), ("the cat", [], "none"), ("a horse", [], "none"), ("dog", [1], "single")]
    assert skipped == Counter(ref_inconsistent=2)
    (d / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        open_dataset(f"grefcoco:{d / 'bad.json'}:{d / 'instances.json'}:{d / 'img'}")

# ---------------------------------------------------------------- SA-1B

def test_sa1b_reader(tmp_path):
    d = tmp_path / "sa_000000"
    img = save_png(str(d / "sa_1.png"), 18, 26, 0)
    save_png(str(d / "sa_4.png"), 18, 26, 4)
    a, b = disc(18, 26, 9, 9, 5), disc(18, 26, 6, 20, 4)
    rle = lambda m: {"size": list(m.shape), "counts": rle_to_string(rle_encode(m)["counts"])}

    def write(name, file_name, masks):
        anns = [{"id": 100 + i, "segmentation": s, "predicted_iou": 0.9, "stability_score": 0.95, "bbox": [0, 0, 1, 1],
                 "area": 1, "point_coords": [[1, 1]], "crop_box": [0, 0, 26, 18]} for i, s in enumerate(masks)]
        (d / name).write_text(json.dumps({"image": {"image_id": 1, "file_name": file_name, "height": 18, "width": 26},
                                          "annotations": anns}))
    write("sa_1.json", "sa_1.png", [rle(a), rle(b)])
    write("sa_2.json", "sa_2.png", [rle(a)])                                       # its image is missing
    (d / "sa_3.json").write_text('{"image": {')                                     # corrupt JSON
    write("sa_4.json", "sa_4.png", [rle(np.ones((5, 5), bool)), rle(b)])            # one mask of another size
    skipped = Counter()
    scenes = list(open_dataset(f"sa1b:{d}", skipped))
    assert [s["id"] for s in scenes] == ["sa_1.png", "sa_4.png"]
    assert np.array_equal(scenes[0]["image"], img) and np.array_equal(scenes[0]["masks"], np.stack([a, b]))
    assert scenes[0]["objects"][1] == {"ann_id": 101, "predicted_iou": 0.9, "stability_score": 0.95}
    assert len(scenes[1]["masks"]) == 1 and scenes[1]["refs"] == []
    assert skipped == Counter(missing_image=1, bad_json=1, mask_size_mismatch=1)
    capped = list(open_dataset(f"sa1b:{d}", max_masks=1))
    assert capped[0]["id"] == "sa_1.png" and all(len(s["masks"]) == 1 for s in capped)
    # the folder of all the unpacked tars: one level of subfolders, each listed when reached
    (tmp_path / "sa_000001").mkdir()
    for f in ("sa_1.json", "sa_1.png"):
        (tmp_path / "sa_000001" / f.replace("_1", "_9")).write_bytes((d / f).read_bytes())
    rec = json.loads((tmp_path / "sa_000001" / "sa_9.json").read_text())
    rec["image"]["file_name"] = "sa_9.png"
    (tmp_path / "sa_000001" / "sa_9.json").write_text(json.dumps(rec))
    assert [s["id"] for s in open_dataset(f"sa1b:{tmp_path}", Counter())] == ["sa_1.png", "sa_4.png", "sa_9.png"]
    with pytest.raises(UserError, match="SA-1B folder .*nowhere does not exist"):
        open_dataset(f"sa1b:{tmp_path / 'nowhere'}")

# ---------------------------------------------------------------- open_dataset and the stages

def test_open_dataset_shapes_and_folders(tmp_path):
    got = open_dataset("shapes:64", split="val")
    for seed, ref in iter_scenes("val", 3, 64):
        s = next(got)
        assert s["id"] == seed and np.array_equal(s["masks"], ref["masks"]) and s["refs"] == ref["refs"]
    assert next(open_dataset("shapes"))["id"] == 0 and next(open_dataset("shapes"))["image"].shape == (128, 128, 3)
    write_folder(str(tmp_path / "f"), "val", 20)
    every = [s["id"] for s in open_dataset(str(tmp_path / "f"))]
    assert every == [s["id"] for s in open_dataset(f"jsonl:{tmp_path / 'f'}")] and len(every) == 20
    parts = [[s["id"] for s in open_dataset(str(tmp_path / "f"), split=sp)] for sp in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == sorted(every)
    for spec, msg in [("imagenet:/x", "neither a dataset folder nor one of"), ("coco:only_one", "coco takes 2"),
                      ("shapes:tiny", "image size"), (str(tmp_path / "nowhere"), "neither a dataset folder")]:
        with pytest.raises(UserError, match=msg):
            open_dataset(spec)
    with pytest.raises(UserError, match="annotations.jsonl"):
        open_dataset(f"jsonl:{tmp_path}")
    # a mixture: one scene of each part in turn, then the rest of the longer one
    val = [i for i in every if split_of(i) == "val"]
    mix = [s["id"] for s in islice(open_dataset(f"jsonl:{tmp_path / 'f'},shapes:48", split="val"), 2 * len(val) + 2)]
    assert mix[0:2 * len(val):2] == val and mix[1::2][:len(val)] == list(range(1_000_000, 1_000_000 + len(val)))
    assert mix[2 * len(val):] == [1_000_000 + len(val), 1_000_001 + len(val)]
    with pytest.raises(UserError, match="nowhere"):
        open_dataset(f"shapes,coco:{tmp_path / 'nowhere.json'}:{tmp_path}")
    with pytest.raises(UserError, match="splits train, val, test"):
        open_dataset("shapes", split="testA")


def test_tokenizer_trains_on_coco(tmp_path):
    """tokenizer.py --data=coco:...: the split, the masks and the whole script on a COCO folder."""
    import tokenizer as T
    from common import configure
    from data import masks
    path = write_coco(str(tmp_path / "coco"), 40, seed=2)
    spec = f"coco:{path}:{tmp_path / 'coco' / 'images'}"
    cfg = configure(T.DEFAULTS, T.PRESETS, ["--image_size=64", f"--data={spec}", "--n_train=5"])
    train = masks.load_split(cfg, "train")
    assert len(train) == 5 and all(split_of(s["id"]) == "train" for s in train)
    ms = masks.MaskSet(train, 64)
    assert len(ms) == sum(len(s["masks"]) for s in train) and ms.images.shape == (5, 64, 64, 3)
    n_val = sum(split_of(im["file_name"]) == "val" for im in json.load(open(path))["images"])
    n_test = sum(split_of(im["file_name"]) == "test" for im in json.load(open(path))["images"])
    assert n_val >= 1 and n_test >= 1                        # seed 2 gives both splits a scene or more
    args = ["--image_size=64", "--d_model=32", "--mlp_dim=64", f"--data={spec}", "--n_train=8", "--n_val=1",
            "--n_test=1", "--pretrain_steps=1", "--pretrain_batch=2", "--batch_size=2", "--steps=2",
            "--unquantized_steps=1", "--kmeans_samples=64", "--log_every=1", "--eval_every=0", f"--out_dir={tmp_path / 'o'}"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr
    assert "data: streamed from coco:" in r.stdout and "test: recon mIoU" in r.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), f"--data=coco:{tmp_path / 'no.json'}:x"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no.json not found" in bad.stderr and "Traceback" not in bad.stderr
