"""infer.py: end to end on a tiny trained checkpoint, tolerant parsing, image formats, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import infer  # noqa: E402
import sft  # noqa: E402
import vlm  # noqa: E402
from common import configure, write_json  # noqa: E402
from conftest import TINY, build, teach  # noqa: E402  (the tiny VLM config; the tokenizer fixture is in conftest.py)
from data.tasks import NO_TARGET  # noqa: E402
from samtok import codes_to_text, load_tokenizer  # noqa: E402

EXAMPLE = os.path.join(ROOT, "data", "example.jpg")
SEGMENT = "Please segment the red circle in this image."
NOTHING = "Please segment the purple star in this image."
# what the tiny VLM is taught to answer about the example image: two masks, and "No target."
TAUGHT = {SEGMENT: codes_to_text([[12, 200], [40, 7]]), NOTHING: NO_TARGET}


@pytest.fixture(scope="module")
def ckpt(tok_ckpt, tmp_path_factory):
    """A tiny Qwen2.5-VL with the mask words, trained until it answers TAUGHT (greedy), saved
    as sft.py saves it: save_pretrained + processor + stage_config.json naming the tokenizer."""
    cfg = configure(sft.DEFAULTS, sft.PRESETS, TINY + [f"--tokenizer_ckpt={tok_ckpt}"])
    model, processor = build(cfg)
    sft.add_mask_tokens(model, processor)
    image = infer.read_image(EXAMPLE, 10 ** 8)
    samples, _ = vlm.tokenize([[dict(prompt=p, answer=a, img=0)] for p, a in TAUGHT.items()], [image], processor, 10 ** 9)
    batch, labels = vlm.collate(samples, [image], processor)
    loss = teach(model, batch, labels, 80)
    assert loss < 0.05, loss
    model.eval()
    path = str(tmp_path_factory.mktemp("vlm") / "model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    write_json(os.path.join(path, vlm.STAGE_CONFIG), cfg)
    return path


def run(args, capsys):
    """infer.main in this process -> (exit code, stdout, stderr)."""
    try:
        infer.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err

# ---------------------------------------------------------------- end to end


def test_end_to_end_writes_each_mask_and_the_overlay(ckpt, tok_ckpt, tmp_path, capsys):
    out = str(tmp_path / "o")
    os.makedirs(out)
    Image.new("L", (4, 4)).save(os.path.join(out, "example_mask7.png"))      # left over from an earlier run
    code, stdout, err = run([EXAMPLE, SEGMENT, f"--ckpt={ckpt}", f"--out={out}"], capsys)
    assert code == 0, err
    assert "answer: [mask 1] [mask 2]" in stdout and "no mask" not in stdout
    assert sorted(os.listdir(out)) == ["example.json", "example_mask1.png", "example_mask2.png", "example_overlay.png"]
    record = json.load(open(os.path.join(out, "example.json")))
    assert record["generated"] == TAUGHT[SEGMENT] and [m["codes"] for m in record["masks"]] == [[12, 200], [40, 7]]
    assert record["tokenizer_ckpt"] == tok_ckpt                  # taken from the checkpoint's stage_config.json
    # every mask PNG is the tokenizer's decoding of its codes over the image, at the image's size
    image = infer.read_image(EXAMPLE, 10 ** 8)
    expected = load_tokenizer(tok_ckpt).decode(image, np.array([[12, 200], [40, 7]]))
    for k in (1, 2):
        png = Image.open(os.path.join(out, f"example_mask{k}.png"))
        assert png.mode == "L" and png.size == (128, 128)
        assert np.array_equal(np.asarray(png) == 255, expected[k - 1]) and set(np.unique(png)) <= {0, 255}
    # overlay: the 128 px image enlarged 4x (nearest), masks coloured, the rest dimmed, a legend below
    ov = np.asarray(Image.open(os.path.join(out, "example_overlay.png")).convert("RGB")).astype(int)
    assert ov.shape[1] == 512 and ov.shape[0] > 512
    big = np.kron(image, np.ones((4, 4, 1), int))
    outside = ~np.kron(expected.any(0), np.ones((4, 4), bool))
    assert np.abs(ov[:512, :512][outside] - (big[outside] * 0.6).astype(np.uint8)).max() <= 1
    inside = np.kron(expected[1] & ~expected[0], np.ones((4, 4), bool))
    assert inside.any() and (ov[:512, :512][inside] != big[inside]).any()
    assert (ov[512:] == 255).mean() > 0.5                         # a white legend strip with text on it
    assert (ov[512:] != 255).any()


def test_no_target_answer_says_no_mask(ckpt, tmp_path, capsys):
    code, stdout, err = run([EXAMPLE, NOTHING, f"--ckpt={ckpt}", f"--out={tmp_path}"], capsys)
    assert code == 0, err
    assert "answer: No target." in stdout and "\nno mask" in stdout
    assert sorted(os.listdir(tmp_path)) == ["example.json", "example_overlay.png"]


@pytest.mark.parametrize("generated, shown", [
    ("", ""),
    ("No target", "No target"),
    ("<|mt_start|><|mt_end|>", "[malformed mask]"),
    ("<|mt_start|><|mt_0300|><|mt_0400|><|mt_end|>", "[malformed mask]"),          # level-2 id first
    ("see <|mt_9999|> here", "see [malformed mask] here"),
    ("<|mt_start|><|mt_00", "[malformed mask]<|mt_00"),                           # cut mid-word
    ("<|im_start|><|object_ref_start|>x<|mt_start|>", "<|im_start|>x [malformed mask]"),
])
def test_malformed_generated_text_prints_the_answer_and_no_mask(ckpt, tmp_path, capsys, monkeypatch, generated, shown):
    monkeypatch.setattr(infer, "chat", lambda *a: generated)
    code, stdout, err = run([EXAMPLE, SEGMENT, f"--ckpt={ckpt}", f"--out={tmp_path}"], capsys)
    assert code == 0 and err == ""
    assert f"answer: {shown}\n" in stdout and "no mask" in stdout
    assert not [f for f in os.listdir(tmp_path) if "_mask" in f]


@pytest.mark.parametrize("text, answer, codes, labels, bad", [
    (codes_to_text([[3, 4]]), "[mask 1]", [(3, 4)], [None], 0),
    # level-1 only (one code), 3+ codes keep two, a level-1 id in the level-2 slot -> -1
    ("<|mt_start|><|mt_0003|><|mt_end|>", "[mask 1]", [(3, -1)], [None], 0),
    ("<|mt_start|><|mt_0003|><|mt_0260|><|mt_0261|><|mt_end|>", "[mask 1]", [(3, 4)], [None], 0),
    ("<|mt_start|><|mt_0003|><|mt_0004|><|mt_end|>", "[mask 1]", [(3, -1)], [None], 0),
    # spans without a valid level-1 code are shown but not numbered or decoded
    ("<|mt_start|><|mt_0300|><|mt_end|>" + codes_to_text([[5, 6]]), "[malformed mask] [mask 1]", [(5, 6)], [None], 1),
    # grounded conversation: the object_ref phrase labels the mask that follows it
    ("A <|object_ref_start|>red circle<|object_ref_end|>" + codes_to_text([[1, 2]]) + " and a "
     "<|object_ref_start|>blue star<|object_ref_end|>" + codes_to_text([[7, 8]]) + ".",
     "A red circle [mask 1] and a blue star [mask 2].", [(1, 2), (7, 8)], ["red circle", "blue star"], 0),
    ("two" + codes_to_text([[1, 2], [3, 4]]) + "masks", "two [mask 1] [mask 2] masks", [(1, 2), (3, 4)], [None, None], 0),
    ("\x00\ufffd<|mt_0001|>", "\x00\ufffd [mask 1]", [(1, -1)], [None], 0),
])
def test_read_answer(text, answer, codes, labels, bad):
    assert infer.read_answer(text) == (answer, codes, labels, bad)


def test_region_mask_goes_into_the_prompt_as_its_two_words(ckpt, tok_ckpt, tmp_path, capsys):
    image = infer.read_image(EXAMPLE, 10 ** 8)
    region = np.zeros((128, 128), bool)
    region[20:60, 30:80] = True
    words = codes_to_text(load_tokenizer(tok_ckpt).encode(image, region[None]).numpy())
    # drawn at 2x the image's size (same aspect ratio): resized, same words
    Image.fromarray(np.kron(region, np.ones((2, 2), bool)).astype(np.uint8) * 255).save(tmp_path / "r.png")
    # a 0/1 label image counts 1 as the region
    Image.fromarray(region.astype(np.uint8)).save(tmp_path / "r01.png")
    for mask, prompt, sent in [("r.png", "Describe the region {mask} in detail.", f"Describe the region {words} in detail."),
                               ("r01.png", "What is this?", f"What is this? {words}")]:
        args = [EXAMPLE, prompt, f"--mask={tmp_path / mask}", f"--ckpt={ckpt}", f"--out={tmp_path / 'o'}"]
        code, stdout, err = run(args, capsys)
        assert code == 0, err
        assert json.load(open(tmp_path / "o" / "example.json"))["prompt_sent"] == sent


def test_tiny_and_very_large_images_run(ckpt, tmp_path, capsys):
    """A 1x1 image and an 8000 px wide strip: the VLM sees them at its own input size, the
    masks come back at the image's size, the overlay is drawn at a viewable size."""
    for name, size in (("dot.png", (1, 1)), ("strip.png", (8000, 12))):
        Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(tmp_path / name)
        code, stdout, err = run([str(tmp_path / name), SEGMENT, f"--ckpt={ckpt}", f"--out={tmp_path / 'o'}"], capsys)
        assert code == 0, err
        stem = name[:-4]
        record = json.load(open(tmp_path / "o" / f"{stem}.json"))
        assert (record["width"], record["height"]) == size
        for m in range(1, len(record["masks"]) + 1):
            assert Image.open(tmp_path / "o" / f"{stem}_mask{m}.png").size == size
        ov = Image.open(tmp_path / "o" / f"{stem}_overlay.png")
        assert 512 <= ov.width <= 2048


def test_default_checkpoint_is_the_newest_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(infer.UserError, match="no checkpoint in out/grpo/model or out/sft/model"):
        infer.find_checkpoint("")
    for k, d in enumerate(("out/grpo/model", "out/sft/model")):
        os.makedirs(d)
        write_json(os.path.join(d, "config.json"), {})
        write_json(os.path.join(d, "stage_config.json"), {"image_size": 128, "stage": d})
        os.utime(os.path.join(d, "config.json"), (1000 + k, 1000 + k))
    assert infer.find_checkpoint("") == ("out/sft/model", {"image_size": 128, "stage": "out/sft/model"})
    os.utime("out/grpo/model/config.json", (2000, 2000))
    assert infer.find_checkpoint("")[0] == "out/grpo/model"
    assert infer.find_checkpoint("out/sft")[0] == os.path.join("out/sft", "model")   # a stage's out_dir


# ---------------------------------------------------------------- image files
def saved(tmp_path, name, img, **kw):
    path = str(tmp_path / name)
    img.save(path, **kw)
    return path


def test_image_formats_become_upright_rgb(tmp_path):
    rgb = np.zeros((6, 10, 3), np.uint8)
    rgb[:, :5] = (200, 30, 40)                                    # left half red
    read = lambda p: infer.read_image(p, 10 ** 8)
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    assert np.array_equal(read(saved(tmp_path, "g.png", Image.fromarray(gray))), np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([rgb, np.zeros((6, 10, 1), np.uint8)], -1)         # fully transparent: alpha dropped
    assert np.array_equal(read(saved(tmp_path, "a.png", Image.fromarray(rgba))), rgb)
    deep = (gray.astype(np.uint16) * 257)                                   # 16-bit: 65535 -> 255
    img16 = read(saved(tmp_path, "d.png", Image.fromarray(deep)))
    assert img16.dtype == np.uint8 and np.array_equal(img16[..., 0], gray)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert np.array_equal(read(saved(tmp_path, "p.png", pal)), rgb)
    assert read(saved(tmp_path, "c.jpg", Image.fromarray(rgb).convert("CMYK"))).shape == (6, 10, 3)
    # EXIF orientation 6 (stored sideways, shown rotated 90 degrees clockwise): the left half goes on top
    exif = Image.Exif()
    exif[infer.EXIF_ORIENTATION] = 6
    up = read(saved(tmp_path, "e.jpg", Image.fromarray(rgb), exif=exif, quality=100))
    assert up.shape == (10, 6, 3)
    assert up[:5, :, 0].mean() > 150 and up[5:, :, 0].mean() < 50
    assert up.flags.writeable


def test_our_pixel_limit_replaces_pils_bomb_guard(tmp_path, monkeypatch):
    path = saved(tmp_path, "big.png", Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)          # PIL alone would refuse 10,000 px
    assert infer.read_image(path, 10 ** 6).shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000                          # and its setting is left as it was
    with pytest.raises(infer.UserError, match="100x100.*--max_pixels"):
        infer.read_image(path, 5000)


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tok_ckpt):
    d = tmp_path_factory.mktemp("bad")
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(d / "ok.png")
    data = open(d / "ok.png", "rb").read()
    open(d / "cut.png", "wb").write(data[:len(data) // 2])
    jpg = open(EXAMPLE, "rb").read()
    open(d / "cut.jpg", "wb").write(jpg[:len(jpg) // 2])
    open(d / "notes.jpg", "w").write("not an image\n")
    os.makedirs(d / "folder.png")
    Image.new("L", (128, 64), 255).save(d / "wide_region.png")     # another aspect ratio than the image
    Image.new("L", (128, 128), 0).save(d / "empty_region.png")
    os.makedirs(d / "no_config")
    write_json(str(d / "foreign" / "config.json"), {"model_type": "qwen2_5_vl"})
    # a Qwen-VL that never had the vocabulary surgery
    cfg = configure(sft.DEFAULTS, sft.PRESETS, TINY + [f"--tokenizer_ckpt={tok_ckpt}"])
    model, processor = build(cfg)
    model.save_pretrained(d / "plain")
    processor.save_pretrained(d / "plain")
    write_json(str(d / "plain" / "stage_config.json"), cfg)
    return d


BAD = [  # (arguments; {d}: the bad-files folder, {ckpt}: the trained checkpoint), what stderr must say
    (["{d}/nowhere.jpg", SEGMENT], "does not exist"),
    (["{d}/folder.png", SEGMENT], "is a folder"),
    (["{d}/notes.jpg", SEGMENT], "is not an image PIL can read"),
    (["{d}/cut.png", SEGMENT], "cannot be decoded, truncated or corrupt"),
    (["{d}/cut.jpg", SEGMENT], "cannot be decoded, truncated or corrupt"),
    ([EXAMPLE, ""], "the prompt is empty"),
    ([EXAMPLE, "   "], "the prompt is empty"),
    ([EXAMPLE], "expected an image and a prompt"),
    ([EXAMPLE, SEGMENT, "extra"], "expected an image and a prompt"),
    ([EXAMPLE, "Describe {{mask}}."], "no --mask=REGION.png"),
    ([EXAMPLE, SEGMENT, "--"], "arguments look like --key=value"),
    ([EXAMPLE, SEGMENT, "--mask"], "--mask needs a value"),                # followed by --out=...: no value
    ([EXAMPLE, SEGMENT, "--mask", "{d}/wide_region.png"], "is 128x64 but the image is 128x128"),   # --key value
    ([EXAMPLE, SEGMENT, "--no_such=1"], "unknown option --no_such"),
    ([EXAMPLE, SEGMENT, "--max_pixels=1000"], "over the limit of"),
    ([EXAMPLE, SEGMENT, "--mask={d}/wide_region.png"], "is 128x64 but the image is 128x128"),
    ([EXAMPLE, SEGMENT, "--mask={d}/empty_region.png"], "is empty"),
    ([EXAMPLE, SEGMENT, "--mask={d}/nowhere.png"], "region mask"),
    ([EXAMPLE, SEGMENT, "--ckpt={d}/nowhere"], "does not exist"),
    ([EXAMPLE, SEGMENT, "--ckpt={tok}"], "is a Stage-1 checkpoint"),
    ([EXAMPLE, SEGMENT, "--ckpt={tokdir}"], "is a Stage-1 checkpoint"),
    ([EXAMPLE, SEGMENT, "--ckpt={d}/no_config"], "no config.json"),
    ([EXAMPLE, SEGMENT, "--ckpt={d}/foreign"], "has no stage_config.json"),
    ([EXAMPLE, SEGMENT, "--ckpt={d}/foreign", "--image_size=128", "--tokenizer_ckpt={tok}"], "cannot load"),
    ([EXAMPLE, SEGMENT, "--ckpt={d}/plain"], "without the 514 mask words"),
    ([EXAMPLE, SEGMENT, "--ckpt={ckpt}", "--tokenizer_ckpt={d}/nowhere.pt"], "no tokenizer checkpoint"),
    ([EXAMPLE, SEGMENT, "--ckpt={ckpt}", "--tokenizer_ckpt={d}/notes.jpg"], "notes.jpg"),
    ([EXAMPLE, SEGMENT, "--ckpt={ckpt}", "--image_size=100"], "multiple of"),
    ([EXAMPLE, SEGMENT, "--ckpt={ckpt}", "--device=tpu"], "--device takes"),
]


@pytest.mark.parametrize("args, says", BAD, ids=[f"{k}-{s[:20]}" for k, (_, s) in enumerate(BAD)])
def test_bad_input_is_one_line_and_writes_nothing(args, says, bad_files, ckpt, tok_ckpt, tmp_path, capsys):
    fill = dict(d=bad_files, ckpt=ckpt, tok=tok_ckpt, tokdir=os.path.dirname(tok_ckpt))
    code, stdout, err = run([a.format(**fill) for a in args] + [f"--out={tmp_path / 'o'}"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not os.path.exists(tmp_path / "o")                      # nothing half-written


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(bad_files, tmp_path, capsys):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    os.chmod(path, 0)
    code, _, err = run([str(path), SEGMENT], capsys)
    assert code == 2 and "not readable" in err


def test_the_readme_command_as_a_process(ckpt, tmp_path):
    """The demo command as written (data/example.jpg ships with the repository), and a bad one:
    one line on stderr, exit 2, no traceback."""
    cmd = [sys.executable, "infer.py", "data/example.jpg", SEGMENT, f"--ckpt={ckpt}", f"--out={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "answer: [mask 1] [mask 2]" in r.stdout and os.path.exists(tmp_path / "example_overlay.png")
    cmd[2] = "data/missing.jpg"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr

# ---------------------------------------------------------------- the benchmarks

def test_benchmark_two_ranks_equal_one(ckpt, tmp_path):
    """infer.py --benchmark with our checkpoint (its square input size) under torchrun on 2 gloo
    ranks (each answers its share of the images) and in one process: the same figures."""
    from test_released import write_benchmark      # (a module-level import would be circular)
    root = write_benchmark(tmp_path / "ref_seg")
    args = [os.path.join(ROOT, "infer.py"), f"--benchmark={root}", f"--ckpt={ckpt}", "--eval_batch=1",
            "--bench_sets=refcoco,grefcoco", "--max_new_tokens=24"]
    runs = {}
    for ranks in (1, 2):
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        p = subprocess.run([sys.executable, *launch, *args, f"--out={tmp_path / str(ranks)}"], capture_output=True,
                           text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[ranks] = json.load(open(tmp_path / str(ranks) / "benchmark.json"))["results"]
    assert runs[1].keys() == runs[2].keys()
    for key in runs[1]:
        for k, v in runs[1][key].items():
            assert (v is None and runs[2][key][k] is None) or abs(v - runs[2][key][k]) < 1e-9, (key, k)
