"""SAMTok tokenizer: the mask-word format, the model's public API, and the training script."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import samtok  # noqa: E402
import tokenizer as T  # noqa: E402
from data import masks  # noqa: E402
from common import UserError, atomic_save, configure  # noqa: E402
from data import make_scene  # noqa: E402

# A SAMTok small enough to build and run in a second: 64 px images, 32-d latent.
TINY = ["--image_size=64", "--d_model=32", "--mlp_dim=64"]
RUN = TINY + ["--n_train=8", "--n_val=4", "--n_test=4", "--pretrain_steps=3", "--pretrain_batch=2",
              "--batch_size=2", "--unquantized_steps=2", "--kmeans_samples=256", "--log_every=1",
              "--eval_every=0", "--ckpt_every=2"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = configure(T.DEFAULTS, T.PRESETS, TINY)
    m = samtok.SAMTok(cfg).eval()
    m.rvq.init_codebooks(torch.randn(512, 32))
    return m


# ---------------------------------------------------------------- masks as words
def test_mask_tokens_are_514_words():
    words = samtok.mask_tokens()
    assert len(words) == 514 == len(set(words))
    assert words[0] == "<|mt_start|>" and words[1] == "<|mt_0000|>" and words[-2] == "<|mt_0511|>"


def test_text_round_trip_all_code_pairs():
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    codes = np.stack([a.ravel(), b.ravel()], 1)          # all 65,536 pairs
    text = samtok.codes_to_text(codes)
    assert samtok.codes_to_text([3, 7]) == "<|mt_start|><|mt_0003|><|mt_0263|><|mt_end|>"
    assert samtok.text_to_codes(text) == [tuple(map(int, c)) for c in codes]
    assert samtok.text_to_codes(samtok.codes_to_text([[9, -1]])) == [(9, -1)]     # level-1-only mask
    with pytest.raises(ValueError):
        samtok.codes_to_text([[256, 0]])


@pytest.mark.parametrize("text, expected", [
    ("no masks here", []),
    ("", []),
    (None, []),
    ("<|mt_start|><|mt_0005|><|mt_0300|><|mt_0400|><|mt_end|>", [(5, 44)]),   # 3 codes: first two kept
    ("<|mt_start|><|mt_0005|><|mt_end|>", [(5, -1)]),                           # 1 code: level 2 missing
    ("<|mt_start|><|mt_0300|><|mt_0005|><|mt_end|>", [(-1, -1)]),               # swapped levels
    ("<|mt_start|><|mt_0005|><|mt_0006|><|mt_end|>", [(5, -1)]),                # level-1 id in the level-2 slot
    ("<|mt_start|><|mt_0999|><|mt_0300|><|mt_end|>", [(-1, 44)]),               # out of range
    ("<|mt_start|><|mt_end|>", []),                                             # empty span
    ("a <|mt_start|><|mt_0001|><|mt_0257|> b <|mt_start|><|mt_0002|><|mt_0258|><|mt_end|>", [(1, 1), (2, 2)]),
    ("<|mt_0001|><|mt_0257|><|mt_end|><|mt_end|><|mt_start|>", [(1, 1)]),       # no start, stray end
    ("<|mt_start|><|mt_12|><|mt_abcd|> <mt_0001> garbage", []),
])
def test_tolerant_parse(text, expected):
    assert samtok.text_to_codes(text) == expected


# ---------------------------------------------------------------- model API
def test_encode_decode_shapes(model):
    s = make_scene(3, size=64)
    codes = model.encode(s["image"], s["masks"])
    assert codes.shape == (len(s["masks"]), 2) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < 256)).all()
    masks = model.decode(s["image"], codes)
    assert masks.shape == s["masks"].shape and masks.dtype == bool
    # a non-square image: masks come back at the image's own size; level-1-only decodes too
    img = np.zeros((40, 90, 3), np.uint8)
    m = np.zeros((1, 40, 90), bool)
    m[0, 10:20, 30:60] = True
    c = model.encode(img, m)
    assert model.decode(img, c).shape == (1, 40, 90)
    assert model.decode(img, [[int(c[0, 0]), -1]]).shape == (1, 40, 90)
    assert model.decode(img, np.zeros((0, 2), int)).shape == (0, 40, 90)


def test_encode_many_is_encode_of_each(model):
    """The codes pass batches images of any sizes: the same codes as one encode() per image."""
    rng = np.random.default_rng(0)
    pairs = []
    for H, W in ((40, 90), (64, 64), (120, 50), (33, 200)):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        m = np.zeros((1 + len(pairs) % 3, H, W), bool)
        for k in range(len(m)):
            m[k, k * H // 4:(k + 2) * H // 4, W // 5:(k + 3) * W // 5] = True
        pairs.append((img, m))
    many = model.encode_many(pairs)
    assert [c.shape[0] for c in many] == [len(m) for _, m in pairs]
    for (img, m), c in zip(pairs, many):
        assert torch.equal(c, model.encode(img, m))


def test_encode_converts_images_and_masks(model):
    s = make_scene(4, size=64)
    ref = model.encode(s["image"], s["masks"])
    gray = s["image"].mean(-1).astype(np.uint8)
    assert model.encode(gray, s["masks"]).shape == ref.shape
    rgba = np.concatenate([s["image"], np.full((64, 64, 1), 255, np.uint8)], -1)
    assert torch.equal(model.encode(rgba, s["masks"]), ref)                    # alpha dropped
    assert torch.equal(model.encode(s["image"], s["masks"].astype(np.uint8) * 255), ref)  # 0/255 masks
    assert torch.equal(model.encode(s["image"], s["masks"].astype(np.float32)), ref)      # float masks
    assert torch.equal(model.encode(s["image"].astype(np.uint16) * 257, s["masks"]), ref)  # 16-bit


def test_encode_rejects_bad_masks(model):
    s = make_scene(5, size=64)
    empty = s["masks"].copy()
    empty[0] = False
    with pytest.raises(ValueError, match="empty"):
        model.encode(s["image"], empty)
    with pytest.raises(ValueError, match="resize the masks"):
        model.encode(s["image"], np.ones((1, 32, 32), bool))
    with pytest.raises(ValueError):
        model.encode(s["image"], np.ones((2, 2, 64, 64), bool))
    with pytest.raises(ValueError):
        model.decode(s["image"], [[300, 0]])


def test_save_load_identical_codes(model, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"stage": "tokenizer", "config": model.config.to_dict(), "model": model.state_dict()}, path)
    loaded = samtok.load_tokenizer(path)
    assert loaded.config == model.config and loaded.checkpoint == path
    s = make_scene(6, size=64)
    assert torch.equal(loaded.encode(s["image"], s["masks"]), model.encode(s["image"], s["masks"]))
    assert np.array_equal(loaded.decode(s["image"], [[1, 2]]), model.decode(s["image"], [[1, 2]]))
    atomic_save({"stage": "sam2", "model": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="not a tokenizer"):
        samtok.load_tokenizer(str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="no tokenizer checkpoint"):
        samtok.load_tokenizer(str(tmp_path / "missing"))


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = configure(T.DEFAULTS, T.PRESETS, TINY)
    m = samtok.SAMTok(cfg)
    ms = masks.MaskSet([make_scene(i, size=64) for i in range(4)], 64)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m.rvq.init_codebooks(torch.randn(256, 32))
    losses = []
    for _ in range(25):
        # the image encoder runs inside the graph: it trains too
        fpn = m.image_features(m.preprocess(ms.images))
        logits, iou_pred, commit, codes = m(fpn, ms.prompts, ms.boxes, img_idx=ms.scene, quantize=True)
        loss, _ = T.mask_loss(logits, iou_pred, ms.masks, cfg)
        opt.zero_grad()
        (loss + commit).backward()
        opt.step()
        losses.append(loss.item())
    assert codes.shape == (len(ms), 2)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_loss_on_the_best_output_or_the_one_the_iou_head_picks():
    """loss_on=best trains the output with the lowest loss (SAM's), loss_on=chosen the one the IoU
    head rates best (the authors' code, the paper preset): the output decode() returns."""
    torch.manual_seed(0)
    logits, iou_pred = torch.randn(4, 3, 16, 16), torch.randn(4, 3)
    gt = torch.rand(4, 16, 16) > 0.5
    cfg = configure(T.DEFAULTS, T.PRESETS, ["--loss_res=16", "--train_iou_head=false"])
    t = gt[:, None].float().expand_as(logits)          # the loss of each output, by the formula
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-1, -2))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-1, -2)) + 1) / (p.sum((-1, -2)) + t.sum((-1, -2)) + 1)
    per = 2.0 * bce + 0.5 * dice
    rows = torch.arange(4)
    assert not torch.equal(per.argmin(1), iou_pred.argmax(1))       # the two rules differ on this batch
    for rule, k in (("best", per.argmin(1)), ("chosen", iou_pred.argmax(1))):
        assert torch.allclose(T.mask_loss(logits, iou_pred, gt, dict(cfg, loss_on=rule))[0], per[rows, k].mean())
    assert configure(T.DEFAULTS, T.PRESETS, ["--preset=paper", "--data=shapes", "--sam2_ckpt=none"])["loss_on"] == "chosen"


def run_script(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_script_interrupt_and_resume(tmp_path):
    out = str(tmp_path / "tok")
    r = run_script(RUN + [f"--out_dir={out}", "--steps=6", "--stop_after=3"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stopping after 3 steps" in r.stdout
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)   # plain tensors and containers only
    assert ck["step"] == 2 and ck["stage"] == "tokenizer"          # the last checkpoint before the stop
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    r = run_script(RUN + [f"--out_dir={out}", "--steps=6", "--resume=true"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 2" in r.stdout and "step     3" in r.stdout and "step     1 " not in r.stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 6
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("recon_miou", "recon_miou_level1", "recon_miou_by_area", "usage", "perplexity",
                "masks_per_s", "train_seconds"):
        assert key in metrics
    assert 0 <= metrics["recon_miou"] <= 1 and len(metrics["usage"]) == 2
    assert os.path.exists(os.path.join(out, "recon.png"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]     # no half-written files
    # the resumed run drew the masks the uninterrupted one draws: the same weights, bit for bit
    r = run_script(RUN + [f"--out_dir={tmp_path / 'whole'}", "--steps=6"], tmp_path)
    assert r.returncode == 0, r.stderr
    whole = torch.load(os.path.join(tmp_path / "whole", "ckpt.pt"), weights_only=True)["model"]
    resumed = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []


def test_script_bad_input(tmp_path):
    r = run_script(["--no_such_option=1"], tmp_path)
    assert r.returncode == 2 and "unknown option --no_such_option" in r.stderr and "Traceback" not in r.stderr
    r = run_script(["--steps=abc"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_script(["--loss_on=worst"], tmp_path)
    assert r.returncode == 2 and "--loss_on takes best or chosen" in r.stderr and "Traceback" not in r.stderr
    r = run_script(RUN + ["--data=" + str(tmp_path / "nowhere"), f"--out_dir={tmp_path / 'o'}"], tmp_path)
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    r = run_script(RUN + [f"--out_dir={tmp_path / 'o2'}", "--resume=true"], tmp_path)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_streamed_folder_of_nonsquare_images_resumes_bit_for_bit(tmp_path):
    """--data=FOLDER streams (data/stream.py, 2 reader processes): JPEG-free PNGs of four sizes,
    an interruption and a resume give the weights of the uninterrupted run, bit for bit."""
    from test_common import nonsquare_names, write_nonsquare_folder
    from data.coco import split_of
    names = [n for n in (f"images/ns_{i}.png" for i in range(200)) if split_of(n) != "test"][:22]
    folder = write_nonsquare_folder(str(tmp_path / "data"), names + nonsquare_names(2),
                                    [(178, 142), (96, 160), (120, 200), (150, 130)] * 6)
    args = RUN + [f"--data={folder}", "--n_train=0", "--pool_batches=2", "--masks_per_image=2", "--steps=8"]
    out = str(tmp_path / "tok")
    r = run_script(args + [f"--out_dir={out}", "--stop_after=5"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "data: streamed from" in r.stdout and "stopping after 5 steps" in r.stdout
    r = run_script(args + [f"--out_dir={out}", "--resume=true"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 4" in r.stdout and os.path.exists(os.path.join(out, "recon.png"))
    assert json.load(open(os.path.join(out, "metrics.json")))["test_masks"] > 0
    r = run_script(args + [f"--out_dir={tmp_path / 'whole'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    whole = torch.load(os.path.join(tmp_path / "whole", "ckpt.pt"), weights_only=True)
    resumed = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert whole["stream"] == resumed["stream"] and len(whole["stream"]) == 2     # one position a reader
    assert [k for k in whole["model"] if not torch.equal(whole["model"][k], resumed["model"][k])] == []
