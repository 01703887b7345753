"""common.py and what every stage shares: --help and the configurator, checkpoint reading that
cannot run code (weights_only=True, for every file the stages write), stop_early, and
vlm.evaluate on scenes that are not square (masks and metrics at each scene's own size)."""

import collections
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import grpo  # noqa: E402
import infer  # noqa: E402
import sft  # noqa: E402
import tokenizer  # noqa: E402
import vlm  # noqa: E402
from common import UserError, configure, iou, read_checkpoint  # noqa: E402
from conftest import TINY, build  # noqa: E402  (and the tok_ckpt fixture)
from data.coco import split_of  # noqa: E402
from data.jsonl import rle_encode  # noqa: E402
from data.shapes import iter_scenes  # noqa: E402
from samtok import codes_to_text, load_tokenizer, text_to_codes  # noqa: E402

# ---------------------------------------------------------------- --help of every stage

STAGES = [("tokenizer.py", tokenizer), ("sft.py", sft), ("grpo.py", grpo), ("infer.py", infer)]


@pytest.mark.parametrize("script, module", STAGES, ids=[s for s, _ in STAGES])
def test_help_lists_every_option_with_its_default_and_the_presets(script, module, tmp_path):
    """`python STAGE.py --help` exits 0 before any work (nothing is written, even with an
    output folder given) and prints every option with its default, the comment beside it in
    DEFAULTS, and the presets."""
    out = str(tmp_path / "o")
    where = "--out" if script == "infer.py" else "--out_dir"
    for flag in ("--help", "-h"):
        r = subprocess.run([sys.executable, script, f"{where}={out}", flag], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        text = r.stdout
        for key, value in module.DEFAULTS.items():
            assert re.search(rf"^\s+--{key}\s+{re.escape(repr(value))}", text, re.M), (script, key, value)
        assert "presets" in text
        for name in module.PRESETS:
            assert re.search(rf"^\s+{re.escape(name)}: ", text, re.M), (script, name)
        assert "auto | cpu | cuda" in text                       # the comment beside device="auto"
        assert not os.path.exists(out)                           # --help did nothing else
    if script == "infer.py":
        assert text.startswith("usage: python infer.py IMAGE")


# ---------------------------------------------------------------- the configurator
DEFAULTS = dict(steps=10, lr=1e-3, name="run", flag=False, sizes=(1, 2), init=None)
PRESETS = {"tiny": {}, "big": dict(steps=1000, name="big")}


def test_configure_takes_both_forms_and_types_like_the_default():
    cfg = configure(DEFAULTS, PRESETS, ["--steps", "5", "--lr=1", "--name", "a b", "--flag", "true",
                                        "--sizes=(3, 4, 5)", "--init", "x/y"])
    assert cfg == dict(steps=5, lr=1.0, name="a b", flag=True, sizes=(3, 4, 5), init="x/y", preset="tiny")
    assert type(cfg["lr"]) is float and type(cfg["steps"]) is int
    assert configure(DEFAULTS, PRESETS, ["--lr", "-0.5"])["lr"] == -0.5          # a negative number is a value
    assert configure(DEFAULTS, PRESETS, ["--flag=no", "--init=none"])["flag"] is False
    assert configure(DEFAULTS, PRESETS, ["--init=none"])["init"] is None
    assert configure(DEFAULTS, PRESETS, ["--name=none"])["name"] == "none"     # a word of a choice stays a word
    # a preset, in either form, then the options over it
    assert configure(DEFAULTS, PRESETS, ["--preset", "big", "--steps=3"]) == dict(DEFAULTS, steps=3, name="big", preset="big")
    assert configure(DEFAULTS, PRESETS, ["--preset=big"])["steps"] == 1000
    assert configure(DEFAULTS, PRESETS, []) == dict(DEFAULTS, preset="tiny")
    assert DEFAULTS["steps"] == 10 and PRESETS["big"] == dict(steps=1000, name="big")   # nothing mutated


@pytest.mark.parametrize("argv, says", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--bogus", "1"], "unknown option --bogus"),
    (["--steps"], "--steps needs a value"),
    (["--steps", "--lr=1"], "--steps needs a value"),
    (["--steps=abc"], "--steps"),
    (["--steps=1.5"], "takes a int"),
    (["--flag=maybe"], "takes true or false"),
    (["--sizes=3"], "takes a tuple"),
    (["steps=3"], "arguments look like --key=value or --key value"),
    (["--"], "arguments look like"),
    (["--preset=huge"], "unknown preset 'huge'"),
])
def test_configure_refuses_with_one_line(argv, says):
    with pytest.raises(UserError) as e:
        configure(DEFAULTS, PRESETS, argv)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["tokenizer.py", "sft.py", "grpo.py"])
def test_paper_preset_refuses_the_toy_world_and_random_weights_unless_asked(script, tmp_path):
    """--preset=paper trains for days: without --data (and, for Stage 1, --sam2_ckpt) on the command
    line it stops at once with one line saying what to pass, before anything is read or written."""
    run = lambda *args: subprocess.run([sys.executable, script, "--preset=paper", f"--out_dir={tmp_path / 'o'}", *args],
                                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    r = run()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--preset=paper needs --data:" in r.stderr
    assert "--data=shapes" in r.stderr and not os.path.exists(tmp_path / "o")
    if script == "tokenizer.py":
        r = run("--data=shapes")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs --sam2_ckpt:" in r.stderr
    # asked explicitly, the configuration goes through
    args = ["--data=shapes"] + (["--sam2_ckpt=none"] if script == "tokenizer.py" else [])
    module = {"tokenizer.py": tokenizer, "sft.py": sft, "grpo.py": grpo}[script]
    cfg = configure(module.DEFAULTS, module.PRESETS, ["--preset=paper", *args], required=module.PAPER_NEEDS)
    assert cfg["data"] == "shapes" and cfg["preset"] == "paper"


def test_infer_takes_options_before_after_and_between_the_positionals():
    image, prompt, cfg = infer.parse_args(["img.jpg", "a prompt", "--out", "x/y"])
    assert (image, prompt, cfg["out"]) == ("img.jpg", "a prompt", "x/y")
    image, prompt, cfg = infer.parse_args(["--out", "x/y", "img.jpg", "--max_new_tokens", "8", "a prompt",
                                           "--device=cpu"])
    assert (image, prompt, cfg["out"], cfg["max_new_tokens"], cfg["device"]) == ("img.jpg", "a prompt", "x/y", 8, "cpu")
    with pytest.raises(UserError, match="--out needs a value"):
        infer.parse_args(["img.jpg", "a prompt", "--out"])
    with pytest.raises(UserError, match="expected an image and a prompt, got 1"):
        infer.parse_args(["img.jpg", "--out", "x/y"])


def test_run_turns_a_user_error_into_one_line_and_exit_2(capsys):
    def bad():
        raise UserError("the thing is wrong")
    with pytest.raises(SystemExit) as e:
        common.run(bad)
    assert e.value.code == 2 and capsys.readouterr().err == "error: the thing is wrong\n"
    assert common.run(lambda: 7) == 7


def test_stop_early_only_when_asked_and_not_at_the_end(capsys):
    cfg = dict(stop_after=2)
    assert not common.stop_early(dict(stop_after=0), 5, 5, 10)      # not asked
    assert not common.stop_early(cfg, 1, 1, 10)                     # not yet
    assert not common.stop_early(cfg, 2, 10, 10)                    # the run is over anyway: finish it
    assert "stopping" not in capsys.readouterr().out
    assert common.stop_early(cfg, 2, 7, 10)
    assert "stopping after 2 steps" in capsys.readouterr().out


# ---------------------------------------------------------------- checkpoints cannot run code
LOADED = []


def _runs_on_load():
    LOADED.append(True)
    return "ran"


class Evil:
    """An object whose unpickling calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return _runs_on_load, ()


def test_read_checkpoint_refuses_a_pickle_that_needs_code(tmp_path):
    good = str(tmp_path / "good.pt")
    torch.save({"x": collections.OrderedDict(a=torch.ones(2)), "step": 3, "cfg": {"lr": 0.1, "t": (1, 2)}}, good)
    ck = read_checkpoint(good)
    assert torch.equal(ck["x"]["a"], torch.ones(2)) and ck["step"] == 3 and ck["cfg"] == {"lr": 0.1, "t": (1, 2)}
    bad = str(tmp_path / "evil.pt")
    torch.save({"model": Evil()}, bad)
    with pytest.raises(UserError) as e:
        read_checkpoint(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad} is not a readable PyTorch checkpoint") and "\n" not in msg
    assert not LOADED                                                    # refused before anything ran
    assert torch.load(bad, weights_only=False)["model"] == "ran" and LOADED   # the file really would run code
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(str(tmp_path / "notes.pt"))
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(str(tmp_path / "nowhere.pt"))


def test_save_checkpoint_train_state_loads_with_weights_only(tmp_path):
    """vlm.save_checkpoint (sft.py's and grpo.py's): the weights, the processor, the stage config and
    train_state.pt (step, optimizer state, config), which resume_dir reads with weights_only=True,
    from the folder or from folder.old (a crash between the two renames of a save)."""
    cfg = configure(sft.DEFAULTS, sft.PRESETS, TINY)
    model, processor = build(cfg)
    model.train()
    opt = common.adamw(model.parameters(), 1e-3, 0.01, 0.95)
    ids = torch.randint(0, 256, (2, 8))                  # byte tokens: no image placeholder among them
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    path = str(tmp_path / "model")
    for step in (4, 5):                               # the second save replaces the first
        vlm.save_checkpoint(model, opt, processor, dict(cfg, stage="sft"), step, path)
    assert sorted(os.listdir(tmp_path)) == ["model"]                  # no .tmp, no .old left behind
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=True)
    assert state["step"] == 5 and state["config"] == dict(cfg, stage="sft")
    stepped = [n for n, p in model.named_parameters() if p.grad is not None]
    assert sorted(state["optimizer"]["state"]) == sorted(stepped)          # by parameter name, unsharded
    assert all(torch.is_tensor(v["exp_avg"]) for v in state["optimizer"]["state"].values())
    src, again = vlm.resume_dir(path)
    assert src == path and again["step"] == 5 and again["config"] == state["config"]
    assert vlm.stage_config(path) == json.loads(json.dumps(dict(cfg, stage="sft")))
    os.replace(path, path + ".old")
    assert vlm.resume_dir(path)[0] == path + ".old"
    os.remove(path + ".old/train_state.pt")
    with pytest.raises(UserError, match="no checkpoint in"):
        vlm.resume_dir(path)


# ---------------------------------------------------------------- vlm.evaluate on non-square scenes
SIZES = [(178, 142), (96, 160), (178, 142), (96, 160)]     # (H, W): taller than wide, wider than tall


def test_names_hash_into_the_test_split():
    assert [split_of(n) for n in nonsquare_names(4)] == ["test"] * 4


def nonsquare_names(n):
    return [f"images/nsq_{i}.png" for i in range(1000) if split_of(f"images/nsq_{i}.png") == "test"][:n]


def reshape_scene(scene, H, W):
    """The 128 px scene padded (and cropped in height when H < 128) to H x W, masks with it. A crop
    keeps every object whole: its window is centred on the rows the masks cover (None if they
    do not fit)."""
    S = scene["image"].shape[0]
    rows = np.flatnonzero(scene["masks"].any((0, 2)))
    if H < S:
        if rows[-1] + 1 - rows[0] > H:
            return None
        top = int(np.clip((rows[0] + rows[-1] + 1) // 2 - H // 2, 0, S - H))
        image, masks, pad_h = scene["image"][top:top + H], scene["masks"][:, top:top + H], 0
    else:
        image, masks, pad_h = scene["image"], scene["masks"], H - S
    pad_w = W - S
    t, l = pad_h // 3, pad_w // 3
    image = np.pad(image, ((t, pad_h - t), (l, pad_w - l), (0, 0)), constant_values=110)
    masks = np.pad(masks, ((0, 0), (t, pad_h - t), (l, pad_w - l)))
    assert image.shape == (H, W, 3) and masks.shape[1:] == (H, W) and masks.reshape(len(masks), -1).any(1).all()
    return image, masks


def write_nonsquare_folder(folder, names=None, sizes=SIZES):
    """A data/jsonl.py folder of shapes-world test scenes padded to the sizes (H, W), one a name
    (default: names that hash into its test split)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    scenes = iter_scenes("test", 200)
    with open(os.path.join(folder, "annotations.jsonl"), "w") as f:
        for name, (H, W) in zip(names or nonsquare_names(len(sizes)), sizes):
            for seed, scene in scenes:
                if (got := reshape_scene(scene, H, W)) is not None:
                    break
            image, masks = got
            Image.fromarray(image).save(os.path.join(folder, name))
            record = {"image": name, "seed": seed, "masks": [rle_encode(m) for m in masks]}
            record.update({k: scene[k] for k in ("objects", "refs", "captions", "grounded")})
            f.write(json.dumps(record) + "\n")
    return folder


@pytest.fixture(scope="module")
def nonsquare(tok_ckpt, tmp_path_factory):
    """The folder, the tiny config-built VLM (with the mask words) and its config."""
    folder = write_nonsquare_folder(str(tmp_path_factory.mktemp("nonsquare")))
    cfg = configure(sft.DEFAULTS, sft.PRESETS, TINY + [f"--tokenizer_ckpt={tok_ckpt}", f"--data={folder}",
                                                      f"--out_dir={tmp_path_factory.mktemp('eval')}", "--eval_batch=64"])
    model, processor = build(cfg)
    sft.add_mask_tokens(model, processor)
    return folder, model, processor, cfg


def test_the_folder_reads_back_at_its_sizes(nonsquare):
    from data import open_dataset
    folder = nonsquare[0]
    scenes = list(open_dataset(folder, split="test"))
    assert [s["image"].shape[:2] for s in scenes] == SIZES
    assert all(s["masks"].shape[1:] == s["image"].shape[:2] and s["refs"] for s in scenes)


def test_evaluate_on_nonsquare_scenes(nonsquare, tok_ckpt, tmp_path):
    """The tiny VLM's own greedy answers on a 178 x 142 and a 96 x 160 scene: finite metrics and a
    gallery, the masks decoded at each scene's own size."""
    folder, model, processor, cfg = nonsquare
    mask_tok = load_tokenizer(tok_ckpt)
    gallery = str(tmp_path / "gallery.png")
    m = vlm.evaluate(model, processor, mask_tok, cfg, n=2, gallery=gallery)
    for key in ("refer_miou", "refer_ciou", "nacc", "exact_match", "caption_attr_acc", "tokenizer_ceiling_miou",
                "refer_miou_single", "refer_miou_none"):
        assert m[key] is not None and math.isfinite(m[key]) and 0 <= m[key] <= 1, (key, m[key])
    assert m["eval_scenes"] == 2 and m["eval_refer"] > 0 and m["eval_captions"] > 0
    assert Image.open(gallery).width >= 256 * 3


def test_evaluate_placeholders_are_at_the_scenes_size(nonsquare, tok_ckpt, monkeypatch):
    """Scripted answers hit every case of the scoring: right words, "No target." where there is a
    target (an empty prediction), a mask where there is none (against an empty target), and "No
    target." where there is none. Every metric is recomputed here from the scenes at their own
    sizes; the gallery's predictions are at each scene's size (an empty one included)."""
    from data import open_dataset
    folder, model, processor, cfg = nonsquare
    mask_tok = load_tokenizer(tok_ckpt)
    said = []

    def scripted(model, processor, samples, images, max_new_tokens, batch):
        out = []
        for k, s in enumerate(samples):
            if s["task"] == "caption":
                text = s["answer"]
            elif s["targets"]:
                text = s["answer"] if k % 2 == 0 else "No target."
            else:
                text = codes_to_text([[5, 9]]) if s["img"] % 2 == 0 else "No target."
            said.append((s, text))
            out.append(text)
        return out

    rows = []
    real_gallery = vlm.save_gallery
    monkeypatch.setattr(vlm, "generate", scripted)
    monkeypatch.setattr(vlm, "save_gallery", lambda path, r: (rows.extend(r), real_gallery(path, r)))
    m = vlm.evaluate(model, processor, mask_tok, cfg, n=len(SIZES), gallery=os.path.join(cfg["out_dir"], "g.png"))

    scenes = list(open_dataset(folder, split="test"))[:len(SIZES)]
    refer = [(s, t) for s, t in said if s["task"] == "refer"]
    kinds = {s["kind"] for s, _ in refer}
    assert {"single", "none"} <= kinds
    assert any(s["targets"] and t == "No target." for s, t in refer)          # an empty prediction
    assert any(not s["targets"] and t != "No target." for s, t in refer)      # a mask, no target
    # per scene one decode of all its predicted masks, in prompt order, as the evaluation does
    codes = [[c for c in text_to_codes(t) if c != (-1, -1)] for _, t in refer]
    decoded = {}
    for img in range(len(scenes)):
        flat = [c for (s, _), cs in zip(refer, codes) if s["img"] == img for c in cs]
        decoded[img] = iter(mask_tok.decode(scenes[img]["image"], np.array(flat).reshape(-1, 2)))
    ious, inter, union = [], 0, 0
    for (s, _), cs in zip(refer, codes):
        scene = scenes[s["img"]]
        empty = np.zeros(scene["image"].shape[:2], bool)
        pred = np.any([next(decoded[s["img"]]) for _ in cs], 0) if cs else empty
        gt = scene["masks"][s["targets"]].any(0) if s["targets"] else empty
        i, u = (pred & gt).sum(), (pred | gt).sum()
        ious.append(i / u if u else 1.0)
        inter, union = inter + i, union + u
    ious = np.array(ious)
    none = np.array([not s["targets"] for s, _ in refer])
    assert m["refer_miou"] == pytest.approx(ious.mean(), abs=1e-9)
    assert m["refer_ciou"] == pytest.approx(inter / union, abs=1e-9)
    assert m["refer_miou_none"] == pytest.approx(ious[none].mean(), abs=1e-9)
    assert m["nacc"] == pytest.approx(np.mean([t == "No target." for (s, t), n in zip(refer, none) if n]))
    assert 0 < m["nacc"] < 1
    assert m["exact_match"] == pytest.approx(np.mean([t == s["answer"] for s, t in refer if s["targets"]]))
    assert m["caption_attr_acc"] == 1.0                                       # the right captions
    # the gallery: prompts with targets, each prediction at its scene's size, the empty ones too
    assert rows and any(not pred.any() for _, _, _, _, pred in rows)
    for scene, s, score, text, pred in rows:
        assert pred.shape == scene["image"].shape[:2] == scene["masks"].shape[1:]
    assert {scene["image"].shape[:2] for scene, *_ in rows} <= set(SIZES)
    assert os.path.exists(os.path.join(cfg["out_dir"], "g.png"))


def single_target_script(answer):
    """A stand-in for vlm.generate: answer(k, sample) for the single-target referring prompts,
    "No target." for every other prompt."""
    def scripted(model, processor, samples, images, max_new_tokens, batch):
        return [answer(k, s) if s["task"] == "refer" and len(s["targets"]) == 1 else "No target."
                for k, s in enumerate(samples)]
    return scripted


def test_right_object_is_the_best_overlapping_object(nonsquare, tok_ckpt, monkeypatch):
    """refer_right_object: a single-target prompt is right when its prediction overlaps the target
    best of the scene's objects (IoU > 0.3). A stand-in decoder paints object c1 of the scene for
    code (c1, c2); the scripted answers name the target, another object, or nothing."""
    from data import open_dataset
    folder, model, processor, cfg = nonsquare
    scenes = list(open_dataset(folder, split="test"))[:len(SIZES)]
    mask_tok = load_tokenizer(tok_ckpt)

    def decode(image, codes):
        scene = next(s for s in scenes if s["image"].shape == image.shape and (s["image"] == image).all())
        return scene["masks"][np.asarray(codes).reshape(-1, 2)[:, 0] % len(scene["masks"])]

    expect = []

    def answer(k, s):
        t, n = s["targets"][0], len(scenes[s["img"]]["masks"])
        choice = [t, (t + 1) % n, None][k % 3] if n > 1 else [t, None][k % 2]
        area = scenes[s["img"]]["masks"][t].mean()
        expect.append((choice == t, "tiny" if area < 0.012 else "big" if area > 0.1 else "medium"))
        return "No target." if choice is None else codes_to_text([[choice, 0]])

    monkeypatch.setattr(vlm, "generate", single_target_script(answer))
    monkeypatch.setattr(mask_tok, "decode", decode)
    m = vlm.evaluate(model, processor, mask_tok, cfg, n=len(SIZES))
    assert 0 < m["refer_right_object"] < 1
    assert abs(m["refer_right_object"] - np.mean([r for r, _ in expect])) < 1e-12
    for size in ("tiny", "medium", "big"):
        want = [r for r, z in expect if z == size]
        assert m[f"refer_right_object_{size}"] == (float(np.mean(want)) if want else None), size


def test_level1_metrics_say_which_word_fails(nonsquare, tok_ckpt, monkeypatch):
    """refer_level1_exact and refer_miou_single_given_level1: scripted single-target answers write
    the tokenizer's words, a wrong level-1 word with the right level-2 one, or nothing; with the
    tokenizer's level-1 word put back the first two score the same mask, the third 0."""
    from data import open_dataset
    folder, model, processor, cfg = nonsquare
    scenes = list(open_dataset(folder, split="test"))[:len(SIZES)]
    mask_tok = load_tokenizer(tok_ckpt)
    expect = []

    def answer(k, s):
        (c1, c2), = text_to_codes(s["answer"])
        scene = scenes[s["img"]]
        right = iou(mask_tok.decode(scene["image"], np.array([[c1, c2]])), scene["masks"][s["targets"]])[0]
        expect.append((k % 3 == 0, right if k % 3 < 2 else 0.0))
        return [s["answer"], codes_to_text([[(c1 + 1) % 256, c2]]), "No target."][k % 3]

    monkeypatch.setattr(vlm, "generate", single_target_script(answer))
    m = vlm.evaluate(model, processor, mask_tok, cfg, n=len(SIZES))
    assert 0 < m["refer_level1_exact"] < 1
    assert m["refer_level1_exact"] == pytest.approx(np.mean([r for r, _ in expect]), abs=1e-12)
    assert m["refer_miou_single_given_level1"] == pytest.approx(np.mean([v for _, v in expect]), abs=1e-6)
