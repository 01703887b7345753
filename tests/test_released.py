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
