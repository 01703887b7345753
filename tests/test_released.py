"""The authors' released SAMTok models, as they lie on the hub: a plain transformers folder (a
Qwen2.5-VL or Qwen3-VL with the 514 mask words and its processor at native resolution) with
mask_tokenizer_256x2.pth and sam2.1_hiera_*.pt inside. Built here from configs (random weights,
real names and shapes): infer.py runs on the folder with nothing but --ckpt, reads the authors'
answer format, and sft.py / grpo.py continue training from it."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo  # noqa: E402
import infer  # noqa: E402
import sft  # noqa: E402
import vlm  # noqa: E402
from common import UserError, configure, run  # noqa: E402
from conftest import TINY, build, teach  # noqa: E402
from samtok import codes_to_text, load_tokenizer, released_files  # noqa: E402
from test_checkpoints import official_sam2, released_state_dict  # noqa: E402
from test_infer import run as infer_main  # noqa: E402  (infer.main in this process -> code, stdout, stderr)

PROMPT = "Please segment the cat in this image."
# the released models answer several targets as a JSON list of mask words and labels
ANSWER = json.dumps([{"mask_2d": codes_to_text([[12, 200]]), "label": "the cat"},
                     {"mask_2d": codes_to_text([[40, 7]]), "label": "the other cat"}])


def photo(path, w=160, h=120):
    """A non-square JPEG with a smooth gradient (a photo's statistics, not a flat colour)."""
    y, x = np.mgrid[:h, :w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def sam2_tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt")
    return path, official_sam2("t", path)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def released(request, sam2_tiny, tmp_path_factory):
    """A folder laid out like zhouyik/*-SAMTok: the VLM (taught to give ANSWER for PROMPT on the
    photo, at its processor's native resolution), its processor, the tokenizer in the authors' key
    names without SAM2's image encoder, and the SAM2.1 checkpoint beside it."""
    folder = tmp_path_factory.mktemp(f"released_{request.param}")
    image = photo(str(folder.parent / f"photo_{request.param}.jpg"))
    cfg = configure(sft.DEFAULTS, sft.PRESETS, TINY + [f"--model_type={request.param}"])
    model, processor = build(cfg)
    sft.add_mask_tokens(model, processor)
    # a released processor keeps the aspect ratio between its min and max pixels (no square resize)
    processor.image_processor.size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256}
    samples, _ = vlm.tokenize([[dict(prompt=PROMPT, answer=ANSWER, img=0)]], [image], processor, 10 ** 9)
    batch, labels = vlm.collate(samples, [image], processor)
    assert tuple(batch["image_grid_thw"][0, 1:].tolist()) == (8, 10)     # 128 x 160 px: not square
    loss = teach(model, batch, labels, 100)
    assert loss < 0.05, loss
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    sd = {k: v for k, v in released_state_dict(sam2_tiny[1]).items() if ".image_encoder." not in k}
    torch.save(sd, folder / "mask_tokenizer_256x2.pth")
    os.link(sam2_tiny[0], folder / "sam2.1_hiera_tiny.pt")
    return str(folder), str(folder.parent / f"photo_{request.param}.jpg"), image


def test_infer_runs_a_released_folder_with_only_ckpt(released, tmp_path, capsys):
    folder, path, image = released
    code, out, err = infer_main([path, PROMPT, "--ckpt", folder, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    record = json.load(open(next(tmp_path.glob("*.json"))))
    assert [m["label"] for m in record["masks"]] == ["the cat", "the other cat"]      # the JSON answer, read
    assert [m["codes"] for m in record["masks"]] == [[12, 200], [40, 7]]
    assert record["tokenizer_ckpt"] == folder and "answer: the cat [mask 1], the other cat [mask 2]" in out
    for f in (tmp_path / n for n in os.listdir(tmp_path) if n.endswith(".png") and "mask" in n):
        assert Image.open(f).size == (160, 120)                                     # each mask at the photo's size
    assert len(list(tmp_path.glob("*mask*.png"))) == 2 and "load" in out and "decode" in out


def test_released_tokenizer_found_in_the_folder(released, sam2_tiny, tmp_path):
    folder = released[0]
    tok_file, sam2_file = released_files(folder)
    assert tok_file.endswith("mask_tokenizer_256x2.pth") and sam2_file.endswith("sam2.1_hiera_tiny.pt")
    mask_tok = load_tokenizer(folder)                                  # the folder itself, as infer.py passes it
    assert mask_tok.checkpoint == tok_file and mask_tok.config.image_size == 1024 and mask_tok.config.mask_threshold == 0.5
    assert torch.equal(mask_tok.state_dict()["image_encoder.trunk.patch_embed.proj.weight"],
                       sam2_tiny[1]["image_encoder.trunk.patch_embed.proj.weight"])
    # two tokenizer files, or none and no SAM2: one line naming the files and what to pass
    two = tmp_path / "two"
    two.mkdir()
    for name in ("mask_tokenizer_256x2.pth", "mask_tokenizer_512x2.pth"):
        os.link(tok_file, two / name)
    with pytest.raises(UserError, match="2 files mask_tokenizer_256x2.pth, mask_tokenizer_512x2.pth.*--tokenizer_ckpt"):
        load_tokenizer(str(two))
    lone = tmp_path / "lone"
    lone.mkdir()
    os.link(tok_file, lone / "mask_tokenizer_256x2.pth")
    with pytest.raises(UserError, match="no SAM2 image encoder and no sam2.1_hiera_.*--sam2_ckpt"):
        load_tokenizer(str(lone))
    assert load_tokenizer(str(lone), sam2_ckpt=sam2_file).config.sam2_config.endswith("hiera_t.yaml")


def test_infer_bad_released_folders(released, tmp_path, capsys):
    folder, path, _ = released
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(folder):
        if not name.startswith(("mask_tokenizer", "sam2.1")):
            os.link(os.path.join(folder, name), bare / name)
    code, _, err = infer_main([path, PROMPT, "--ckpt", str(bare)], capsys)
    assert code == 2 and err.count("\n") == 1 and "no mask_tokenizer_*.pth" in err and "--tokenizer_ckpt" in err
    os.link(os.path.join(folder, "mask_tokenizer_256x2.pth"), bare / "mask_tokenizer_256x2.pth")
    code, _, err = infer_main([path, PROMPT, "--ckpt", str(bare)], capsys)
    assert code == 2 and err.count("\n") == 1 and "--sam2_ckpt" in err


def test_sft_and_grpo_continue_a_released_model(released, tmp_path, monkeypatch, capsys):
    """--base_model=FOLDER (sft.py) and --init_from=FOLDER (grpo.py): the mask words are already in
    the vocabulary, so there is no second surgery (same vocabulary, same rows before training), and
    the tokenizer defaults to the folder's own."""
    folder = released[0]
    before = vlm.load_pretrained(folder, dict(image_size=0))[0].get_input_embeddings().weight.detach().clone()
    base = ["--n_train=2", "--steps=1", "--eval_n=0", "--ckpt_every=1", "--vision_pretrain_steps=0"]
    monkeypatch.setattr(sys, "argv", ["sft.py", f"--base_model={folder}", f"--out_dir={tmp_path / 'sft'}", *base])
    run(sft.main)
    out = capsys.readouterr().out
    assert "the one " + folder + " carries" in out
    model, processor = vlm.load_pretrained(str(tmp_path / "sft" / "model"), dict(image_size=128))
    rows = model.get_input_embeddings().weight
    assert rows.shape == before.shape and len(processor.tokenizer) <= rows.shape[0]
    assert vlm.stage_config(str(tmp_path / "sft" / "model"))["tokenizer_ckpt"] == folder
    monkeypatch.setattr(sys, "argv", ["grpo.py", f"--init_from={folder}", f"--out_dir={tmp_path / 'grpo'}", "--n_train=2",
                                      "--steps=1", "--eval_n=0", "--batch_size=8", "--micro_batch=8", "--max_new_tokens=160",
                                      "--temperature=0.05"])   # the taught answer, then the end of its turn
    run(grpo.main)
    out = capsys.readouterr().out
    assert "step    1/1" in out and "the one " + folder + " carries" in out

# ---------------------------------------------------------------- the benchmarks (infer.py --benchmark)
SIZES = ((160, 120), (96, 200), (240, 180))         # width x height: landscape, portrait, larger


def write_benchmark(root):
    """A folder laid out as the benchmarks are (the refer API's): refcoco/refs(unc).p and
    grefcoco/grefs(unc).json, each beside its instances.json, and the images as COCO train2014
    JPEGs of three non-square sizes. RefCOCO: two images in val, one in testA and testB; gRefCOCO: a multi-target, a
    single-target and two no-target expressions in val, one expression in testA and testB."""
    import pickle
    images_dir = root / "images" / "mscoco" / "images" / "train2014"
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for i, (w, h) in enumerate(SIZES, 1):
        name = f"COCO_train2014_{i:012d}.jpg"
        photo(str(images_dir / name), w, h)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        for j, (x0, y0, x1, y1) in enumerate([(0.1, 0.1, 0.5, 0.6), (0.55, 0.3, 0.95, 0.9)]):
            x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
            anns.append({"id": 10 * i + j, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    instances = json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cat"}]})
    sent = lambda *xs: [{"sent": x} for x in xs]
    refs = [{"ref_id": k, "image_id": i, "ann_id": 10 * i + j, "split": split, "category_id": 1, "sentences": sent("the cat")}
            for k, (i, j, split) in enumerate([(1, 0, "val"), (2, 1, "val"), (3, 0, "testA"), (3, 1, "testB")])]
    grefs = [{"ref_id": 1, "image_id": 1, "ann_id": [10, 11], "no_target": False, "split": "val", "sentences": sent("the cat")},
             {"ref_id": 2, "image_id": 1, "ann_id": [11], "no_target": False, "split": "val", "sentences": sent("the dog")},
             {"ref_id": 3, "image_id": 1, "ann_id": [-1], "no_target": True, "split": "val", "sentences": sent("a horse", "a ghost")},
             {"ref_id": 4, "image_id": 2, "ann_id": [20], "no_target": False, "split": "testA", "sentences": sent("the dog")},
             {"ref_id": 5, "image_id": 3, "ann_id": [-1], "no_target": True, "split": "testB", "sentences": sent("a ghost")}]
    for name, refs_file, data in (("refcoco", "refs(unc).p", refs), ("grefcoco", "grefs(unc).json", grefs)):
        (root / name).mkdir()
        (root / name / "instances.json").write_text(instances)
        if refs_file.endswith(".p"):
            with open(root / name / refs_file, "wb") as f:
                pickle.dump(data, f, protocol=2)
        else:
            (root / name / refs_file).write_text(json.dumps(data))
    return str(root)


# what the stand-in for generation answers to each phrase: two masks in the authors' JSON, one
# mask, "No target." (right for a no-target phrase), a mask for a no-target phrase (wrong)
FAKE = {"the cat": ANSWER, "the dog": codes_to_text([[5, 9]]), "a horse": "No target.", "a ghost": codes_to_text([[77, 1]])}


def fake_decode(mask_tok, image, codes):
    """A stand-in for the decoder (the random tokenizer paints nothing): code (c1, c2) -> the
    top-left box of (c1 % 7 + 4) tenths of the height and (c2 % 7 + 4) tenths of the width."""
    H, W = image.shape[:2]
    out = np.zeros((len(codes), H, W), bool)
    for k, (c1, c2) in enumerate(codes):
        out[k, :H * (c1 % 7 + 4) // 10, :W * (c2 % 7 + 4) // 10] = True
    return out


def expected(root, name, split):
    """gIoU, cIoU, N-acc of FAKE's answers, computed here directly from the definitions."""
    from data import open_dataset
    from infer import BENCHMARKS, read_answer
    spec = f"{name}:{root}/{name}/{BENCHMARKS[name][0]}:{root}/{name}/instances.json:{root}/images/mscoco/images/train2014"
    ious, inter, union, none = [], 0, 0, []
    for s in open_dataset(spec, split=split):
        for r in s["refs"]:
            codes = read_answer(FAKE[r["text"]])[1]
            pred = fake_decode(None, s["image"], codes).any(0)
            gt = s["masks"][r["targets"]].any(0) if r["targets"] else np.zeros_like(pred)
            assert pred.shape == gt.shape == s["image"].shape[:2]
            i, u = (pred & gt).sum(), (pred | gt).sum()
            ious.append(i / u if u else 1.0)
            if r["targets"]:
                inter, union = inter + i, union + u
            else:
                none.append(not pred.any())
    return dict(giou=np.mean(ious), ciou=inter / union if union else None, nacc=np.mean(none) if none else None,
                expressions=len(ious))


def test_benchmark_scores_by_the_definitions(released, tmp_path, monkeypatch, capsys):
    """infer.py --benchmark on a released folder: every split of RefCOCO and gRefCOCO found (the
    missing RefCOCO+ / RefCOCOg skipped), each expression's masks decoded at its image's own size,
    gIoU / cIoU / N-acc as the definitions give them, both tables printed."""
    folder = released[0]
    root = write_benchmark(tmp_path / "ref_seg")
    monkeypatch.setattr(vlm, "generate", lambda model, processor, samples, images, n, batch: [
        FAKE[s["turns"][0]["prompt"].removeprefix("Please segment ").removesuffix(" in this image.")] for s in samples])
    monkeypatch.setattr(infer, "decode_masks", fake_decode)
    code, out, err = infer_main([f"--benchmark={root}", f"--ckpt={folder}", f"--out={tmp_path / 'o'}"], capsys)
    assert code == 0, err
    got = json.load(open(tmp_path / "o" / "benchmark.json"))["results"]
    assert sorted(got) == ["grefcoco mean", "grefcoco testA", "grefcoco testB", "grefcoco val", "refcoco testA",
                           "refcoco testB", "refcoco val"]
    assert got["grefcoco mean"]["ciou"] is None     # testB has no target: no cIoU, so no mean of it
    assert abs(got["grefcoco mean"]["giou"] - np.mean([got[f"grefcoco {sp}"]["giou"] for sp in ("val", "testA", "testB")])) < 1e-12
    for key, m in ((k, m) for k, m in got.items() if k != "grefcoco mean"):
        want = expected(root, *key.split())
        assert m["expressions"] == want["expressions"]
        for k in ("giou", "ciou", "nacc"):
            assert (m[k] is None) == (want[k] is None) and (m[k] is None or abs(m[k] - want[k]) < 1e-9), (key, k)
    assert 0 < got["refcoco val"]["ciou"] < 1 and got["grefcoco val"]["nacc"] == 0.5 and got["grefcoco testB"]["nacc"] == 0.0 and got["grefcoco testB"]["ciou"] is None
    assert "skipping" in out and "refcoco+" in out and "| cIoU | refcoco val | refcoco testA |" in out
    assert f"| {os.path.basename(folder)} | {100 * got['refcoco val']['ciou']:.1f} |" in out
    assert "| gRefCOCO | val gIoU | val cIoU | val N-acc |" in out


def test_benchmark_bad_input(released, tmp_path, capsys):
    folder = released[0]
    code, _, err = infer_main([f"--benchmark={tmp_path / 'nope'}", f"--ckpt={folder}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a folder" in err
    root = write_benchmark(tmp_path / "ref_seg")
    code, _, err = infer_main([f"--benchmark={root}", "--bench_sets=refcocog", f"--ckpt={folder}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "refcocog/refs(umd).p not found" in err
    code, _, err = infer_main([f"--benchmark={root}", "--bench_sets=refclef"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown benchmark 'refclef'" in err
    code, _, err = infer_main([f"--benchmark={root}", "image.jpg", "segment it"], capsys)
    assert code == 2 and err.count("\n") == 1 and "drop 'image.jpg'" in err


def test_native_resolution_batches_equal_one_at_a_time(released, tmp_path):
    """At native resolution each image has its own count of visual tokens: a batch of prompts on
    images of three sizes (left-padded together) generates what each prompt generates alone."""
    folder, path, image = released
    model, processor = vlm.load_pretrained(folder, dict(image_size=0))
    images = [image] + [photo(str(tmp_path / f"{w}x{h}.jpg"), w, h) for w, h in SIZES[1:]]
    samples, _ = vlm.tokenize([[dict(prompt=PROMPT, answer="", img=i)] for i in range(3)], images, processor, 10 ** 9)
    counts = [s["ids"].count(processor.image_token_id) for s in samples]
    assert len(set(counts)) == 3, counts                  # three sizes, three counts of visual tokens
    together = vlm.generate(model.eval(), processor, samples, images, 80, batch=3)
    alone = [vlm.generate(model, processor, [s], images, 80, batch=1)[0] for s in samples]
    assert together == alone and together[0] == ANSWER


def test_cpu_dtype_is_fp32_unless_it_does_not_fit(released, capsys):
    """--dtype=auto on a CPU: fp32 (faster there), bf16 when the fp32 weights and the file being
    read would not fit in the free memory, with one line saying so."""
    folder = released[0]
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert infer.cpu_dtype(folder, free=100 * size) == torch.float32 and capsys.readouterr().out == ""
    assert infer.cpu_dtype(folder, free=size) == torch.bfloat16
    assert "loading it in bf16" in capsys.readouterr().out


def write_mixed_folder(folder, sizes=((178, 142), (96, 160), (120, 200))):
    """A data/jsonl.py folder of shapes-world scenes padded to non-square sizes (H, W), named so
    that three hash into the train split and two into the test split."""
    from data.coco import split_of
    from test_common import write_nonsquare_folder
    names = [f"images/mix_{i}.png" for sp, n in (("train", 3), ("test", 2))
             for i in [i for i in range(2000) if split_of(f"images/mix_{i}.png") == sp][:n]]
    return write_nonsquare_folder(folder, names, [sizes[k % len(sizes)] for k in range(len(names))])


def test_sft_and_grpo_at_native_resolution_on_nonsquare_images(released, tok_ckpt, tmp_path, monkeypatch, capsys):
    """--image_size=0 with a released model: the VLM reads each non-square image at its processor's
    native resolution (its own count of visual tokens), Stage 2 trains and evaluates, Stage 3
    continues from it, the masks scored at each image's own size. (The tiny tokenizer stands in
    for the folder's 1024 px one, which costs seconds an image on a CPU.)"""
    folder = released[0]
    data = write_mixed_folder(str(tmp_path / "mixed"))
    base = [f"--data={data}", "--image_size=0", "--n_train=3", "--steps=1", "--eval_n=2", "--eval_batch=4",
            f"--tokenizer_ckpt={tok_ckpt}"]
    monkeypatch.setattr(sys, "argv", ["sft.py", f"--base_model={folder}", f"--out_dir={tmp_path / 'sft'}", "--batch_size=4",
                                      "--vision_pretrain_steps=0", "--lr=1e-7", *base])    # a step that keeps its answers
    run(sft.main)
    out = capsys.readouterr().out
    assert "step     1/1" in out and "test: referring mIoU" in out
    metrics = json.load(open(tmp_path / "sft" / "metrics.json"))
    assert metrics["eval_scenes"] == 2 and 0 <= metrics["refer_miou"] <= 1
    model, processor = vlm.load_pretrained(str(tmp_path / "sft" / "model"), dict(image_size=0))
    images, samples, _, _ = vlm.load_world("train", 3, load_tokenizer(tok_ckpt), dict(sft.DEFAULTS, data=data, image_size=0,
                                           out_dir=str(tmp_path / "sft")), ("refer",))
    convs, _ = vlm.tokenize([[s] for s in samples], images, processor, 10 ** 9)
    assert len({c["ids"].count(processor.image_token_id) for c in convs}) >= 2      # sizes with their own counts
    monkeypatch.setattr(sys, "argv", ["grpo.py", f"--init_from={tmp_path / 'sft'}", f"--out_dir={tmp_path / 'grpo'}",
                                      "--batch_size=8", "--micro_batch=8", "--max_new_tokens=160", "--temperature=0.05", *base])
    run(grpo.main)
    out = capsys.readouterr().out
    assert "step    1/1" in out and json.load(open(tmp_path / "grpo" / "metrics.json"))["after"]["eval_scenes"] == 2


def test_image_size_zero_needs_a_released_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sft.py", "--image_size=0", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        run(sft.main)
    assert e.value.code == 2 and "--image_size=0 (native resolution) is for a released Qwen-VL" in capsys.readouterr().err
