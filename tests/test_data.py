"""
Tests for the synthetic shapes world (data.shapes) and the folder format (data.jsonl).

Every text/mask pairing is verified symbolically through data.shapes.matches, so a
bug in either the generator or the expressions shows up here. Runs in a few seconds.
"""
import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from data.jsonl import main, read_folder, rle_decode, rle_encode, write_folder
from data.shapes import COLORS, SHAPES, SIZES, SPLITS, make_scene, matches, scene_seeds, where

SEEDS = list(range(1_000_000, 1_000_200))   # 200 val scenes, shared by the tests below


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(s) for s in SEEDS]


def tight_box(m):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]

# ----------------------------------------------------------------------------- scenes

def test_determinism():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["masks"].tobytes() == b["masks"].tobytes()
    assert json.dumps([a["objects"], a["refs"], a["captions"], a["grounded"]]) == \
        json.dumps([b["objects"], b["refs"], b["captions"], b["grounded"]])
    assert a["image"].tobytes() != c["image"].tobytes()


def test_masks_boxes(scenes):
    for sc in scenes:
        img, masks, boxes = sc["image"], sc["masks"], sc["boxes"]
        assert img.dtype == np.uint8 and img.shape == (128, 128, 3)
        assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (128, 128)
        n = len(masks)
        assert 1 <= n <= 6 and boxes.shape == (n, 4) and boxes.dtype == np.float32
        assert len(sc["objects"]) == n and len(sc["captions"]) == n
        assert (masks.reshape(n, -1).sum(1) >= 12).all()              # non-empty, >= 12 px
        assert masks.sum(0).max() <= 1                                # visible parts disjoint
        for m, box, obj in zip(masks, boxes, sc["objects"]):
            assert box.tolist() == tight_box(m)
            assert obj["area"] == pytest.approx(m.sum() / 128 ** 2)


def test_shapes_are_visible(scenes):
    # shapes are saturated colours on a muted background: mean shape colour close to
    # its nominal RGB, and clearly far from the mean background colour
    for sc in scenes[:50]:
        bg = sc["image"][~sc["masks"].any(0)].mean(0)
        for m, obj in zip(sc["masks"], sc["objects"]):
            mean = sc["image"][m].mean(0)
            assert np.abs(mean - COLORS[obj["color"]]).max() < 25
            assert np.abs(mean - bg).max() > 40


def test_refs_resolve(scenes):
    kinds = Counter()
    for sc in scenes:
        objs = sc["objects"]
        for ref in sc["refs"]:
            found = [i for i, o in enumerate(objs) if matches(o, ref["attrs"])]
            assert found == ref["targets"], ref
            kinds[ref["kind"]] += 1
            if ref["kind"] == "single":
                assert len(found) == 1
            elif ref["kind"] == "multi":
                assert len(found) >= 2 and ref["text"].startswith("all the ")
            else:
                assert ref["kind"] == "none" and found == []
            for key in ("color", "shape", "size"):             # the text says what attrs say
                if key in ref["attrs"]:
                    assert ref["attrs"][key] in ref["text"]
            if "position" in ref["attrs"]:
                assert ref["text"].endswith(" " + where(ref["attrs"]["position"]))
        # every object that has *some* unique description got at least one single ref
        singles = {r["targets"][0] for r in sc["refs"] if r["kind"] == "single"}
        for i, o in enumerate(objs):
            if [j for j, p in enumerate(objs) if matches(p, {"color": o["color"], "shape": o["shape"]})] == [i]:
                assert i in singles
    assert kinds["single"] > 200 and kinds["multi"] > 20 and kinds["none"] == len(scenes)


def test_matches_position_words():
    obj = {"color": "red", "shape": "star", "size": "small", "position": "top left", "area": 0.01}
    assert matches(obj, {"position": "left"}) and matches(obj, {"position": "top left"})
    assert not matches(obj, {"position": "bottom left"}) and not matches(obj, {"color": "blue"})


def test_captions_and_grounded(scenes):
    for sc in scenes:
        n, g = len(sc["objects"]), sc["grounded"]
        assert sorted(i for _, _, i in g["spans"]) == list(range(n))   # each object once
        for (s, e, i), cap in zip(g["spans"], [sc["captions"][i] for _, _, i in g["spans"]]):
            phrase = g["text"][s:e]
            obj = sc["objects"][i]
            assert phrase.startswith(f"{obj['size']} {obj['color']} {obj['shape']}")
            assert cap == f"a {phrase}."                               # caption = same phrase
        assert g["text"].startswith("A ") and g["text"].endswith(".")


def test_size_distribution_and_coverage(scenes):
    objs = [o for sc in scenes for o in sc["objects"]]
    areas = np.array([o["area"] for o in objs])
    assert (areas <= 0.01).mean() > 0.15            # tiny objects are common
    assert (areas >= 0.10).mean() > 0.05            # and some are big
    assert areas.max() < 0.40
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["color"] for o in objs} == set(COLORS)
    assert {o["size"] for o in objs} == {"small", "medium", "big"} == set(SIZES)
    assert len({o["position"] for o in objs}) == 9


def test_splits():
    ranges = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint
    assert scene_seeds("test", 3) == range(2_000_000, 2_000_003)
    with pytest.raises(ValueError, match="unknown split"):
        scene_seeds("nope", 1)
    with pytest.raises(ValueError, match="out of range"):
        scene_seeds("val", 10_001)

# ----------------------------------------------------------------------------- RLE and folders

def test_rle_round_trip():
    rng = np.random.default_rng(0)
    cases = [rng.random((7, 5)) < p for p in (0.1, 0.5, 0.9)]
    cases += [np.zeros((4, 6), bool), np.ones((4, 6), bool), np.eye(5, dtype=bool)]
    first_off = np.ones((3, 3), bool); first_off[0, 0] = False
    cases += [first_off, make_scene(3)["masks"][0]]
    for m in cases:
        rle = rle_encode(m)
        assert sum(rle["counts"]) == m.size and rle["size"] == list(m.shape)
        assert np.array_equal(rle_decode(rle), m)
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]       # starts with the 0s
    assert rle_encode(np.array([[0, 1], [0, 1]], bool))["counts"] == [2, 2]   # column-major
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_folder_round_trip(tmp_path):
    path = write_folder(str(tmp_path), "val", 5)
    assert path == os.path.join(str(tmp_path), "annotations.jsonl")
    skipped = Counter()
    got = list(read_folder(str(tmp_path), skipped))
    assert len(got) == 5 and not skipped
    for seed, sc in zip(scene_seeds("val", 5), got):
        ref = make_scene(seed)
        assert sc["id"] == f"images/{seed}.png"
        assert np.array_equal(sc["image"], ref["image"])
        assert np.array_equal(sc["masks"], ref["masks"])
        assert np.array_equal(sc["boxes"], ref["boxes"])
        assert sc["refs"] == ref["refs"] and sc["grounded"] == ref["grounded"]


def test_reader_skips_and_counts(tmp_path):
    write_folder(str(tmp_path), "val", 3)
    lines = open(tmp_path / "annotations.jsonl").read().splitlines()
    recs = [json.loads(l) for l in lines]
    # corrupt image: a truncated PNG; missing image: a path that does not exist
    png = (tmp_path / recs[0]["image"]).read_bytes()
    (tmp_path / "images" / "broken.png").write_bytes(png[: len(png) // 2])
    bad_image = {**recs[0], "image": "images/broken.png"}
    missing = {**recs[0], "image": "images/nope.png"}
    # one wrong-size mask and one empty mask inside an otherwise good sample
    partial = dict(recs[1])
    partial["masks"] = recs[1]["masks"] + [rle_encode(np.ones((10, 10), bool)),
                                           rle_encode(np.zeros((128, 128), bool))]
    partial["captions"] = recs[1]["captions"] + ["a bad one.", "an empty one."]
    # 16-bit greyscale and palette images must come back as 8-bit RGB
    grey16 = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) * 4   # up to 65532
    Image.fromarray(grey16).save(tmp_path / "images" / "g16.png")
    Image.fromarray(make_scene(5)["image"]).convert("P").save(tmp_path / "images" / "pal.png")
    g16 = {"image": "images/g16.png", "masks": recs[2]["masks"]}
    pal = {"image": "images/pal.png", "masks": recs[2]["masks"]}
    out = [json.dumps(r) for r in (bad_image, missing, partial, g16, pal)]
    out.insert(2, '{"image": "images/1000000.png", "masks": [')    # malformed JSON line
    (tmp_path / "annotations.jsonl").write_text("\n".join([lines[0]] + out) + "\n")

    skipped = Counter()
    got = list(read_folder(str(tmp_path), skipped))
    assert [s["id"] for s in got] == [recs[0]["image"], recs[1]["image"], "images/g16.png", "images/pal.png"]
    assert skipped == Counter(unreadable_image=1, missing_image=1, malformed_line=1,
                              mask_size_mismatch=1, empty_mask=1, objects_dropped=1)
    assert len(got[1]["masks"]) == len(recs[1]["masks"])           # the good masks were kept
    assert got[1]["captions"] == recs[1]["captions"]                # ... with their captions
    assert "objects" not in got[1]                                   # length no longer fits
    for sc in got:
        assert sc["image"].dtype == np.uint8 and sc["image"].shape == (128, 128, 3)
    # 16-bit values rescaled to 8 bits (PIL's own convert would clip everything at 255)
    assert np.array_equal(got[2]["image"][:, :, 1], np.round(grey16 / 257).astype(np.uint8))


def test_dark_16bit_image_stays_dark(tmp_path):
    """A 16-bit image whose values all lie below 256 is nearly black, not an 8-bit image."""
    from data.jsonl import load_rgb
    dark = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I")
    assert load_rgb(str(tmp_path / "dark16.png")).max() == 1          # 255 / 257 rounds to 1


def test_reader_drops_refs_to_dropped_masks(tmp_path):
    write_folder(str(tmp_path), "val", 1)
    rec = json.loads(open(tmp_path / "annotations.jsonl").read())
    rec["masks"][0] = rle_encode(np.zeros((128, 128), bool))            # object 0 vanishes
    (tmp_path / "annotations.jsonl").write_text(json.dumps(rec) + "\n")
    skipped = Counter()
    got = list(read_folder(str(tmp_path), skipped))
    n_old = len(rec["masks"])
    assert n_old >= 2                       # val seed 1_000_000 has 3 objects
    sc = got[0]
    assert len(sc["masks"]) == n_old - 1 and len(sc["captions"]) == n_old - 1
    assert all(0 <= t < n_old - 1 for r in sc["refs"] for t in r["targets"])
    dropped = sum(1 for r in rec["refs"] if 0 in r["targets"])
    assert skipped["ref_dropped"] == dropped and len(sc["refs"]) == len(rec["refs"]) - dropped
    assert sorted(i for _, _, i in sc["grounded"]["spans"]) == list(range(n_old - 1))


def test_reader_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_folder(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="annotations.jsonl"):
        read_folder(str(tmp_path))


def test_command_line(tmp_path, capsys):
    assert main([f"--out={tmp_path}", "--split=test", "--n=2", "--size=64"]) == 0
    assert "wrote 2 scenes" in capsys.readouterr().out
    assert Image.open(tmp_path / "images" / "2000000.png").size == (64, 64)
    assert main(["--split=nope"]) == 2
    assert main(["--n=many"]) == 2
    assert main(["--bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
