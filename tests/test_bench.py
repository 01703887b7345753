"""bench.py and its sections (benchmarks/): the pieces whose figures must be right. The mask
encoders (contour tracing, polygon simplification and rasterization, box, RLE) round-trip on toy
masks; the quantizer comparison holds vector-quantize-pytorch to the same codes; TRL's collator
sees exactly sft.py's tokens; the stages' step lines are read; the GPU check's code paths run at
tiny sizes; bad options exit with one line. The peer comparisons are skipped when the peers are
not installed (pip install vector-quantize-pytorch==1.32.0 trl==1.16.0)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench  # noqa: E402
from benchmarks import encodings, gpu, rvq  # noqa: E402
from common import configure, iou  # noqa: E402


def disc(H, W, cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return np.hypot(yy - cy, xx - cx) < r


def toy_masks():
    """Shapes that stress a tracer: an L, pixels touching only at corners, a ring (a hole), a
    one-pixel mask, a mask touching the border, random blobs."""
    H = W = 24
    L = np.zeros((H, W), bool)
    L[2:8, 3:12] = True
    L[8:20, 3:6] = True
    diag = np.zeros((H, W), bool)
    diag[[1, 2, 3, 2], [1, 2, 1, 4]] = True
    ring = disc(H, W, 11.5, 11.5, 9) & ~disc(H, W, 11.5, 11.5, 4)
    dot = np.zeros((H, W), bool)
    dot[5, 7] = True
    edge = np.zeros((H, W), bool)
    edge[:, :4] = True
    edge[0, :] = True
    rng = np.random.default_rng(0)
    blobs = [rng.random((H, W)) < 0.35 for _ in range(3)]
    return [L, diag, ring, dot, edge, *blobs]


def test_trace_and_rasterize_round_trip():
    for m in toy_masks():
        loops = encodings.trace_loops(m)
        assert encodings.rasterize([p for p, _ in loops], *m.shape).tolist() == m.tolist()
        # even-odd reading: outer outlines run one way, holes the other
        outer = sum(a for _, a in loops if a < 0)
        holes = sum(a for _, a in loops if a > 0)
        assert -outer - holes == m.sum()


def test_ring_has_a_hole_and_diagonal_pixels_are_separate_loops():
    ring = toy_masks()[2]
    assert sorted(a > 0 for _, a in encodings.trace_loops(ring)) == [False, True]
    diag = toy_masks()[1]
    assert len(encodings.trace_loops(diag)) == 4          # 4-connected: four single pixels


def test_polygon_budget_and_quantization():
    sq = np.zeros((128, 128), bool)
    sq[10:50, 20:90] = True
    # a rectangle is exactly 4 vertices, and 256 bins over 128 px keep every pixel centre on its side
    poly = encodings.polygon_encode(sq, 4)
    assert [len(p) for p in poly] == [4]
    assert iou(encodings.rasterize(poly, 128, 128)[None], sq[None])[0] == 1.0
    # a disc: more vertices, better outline, never over budget
    d = disc(128, 128, 60.3, 70.1, 30)
    ious = []
    for k in (4, 8, 16, 32):
        poly = encodings.polygon_encode(d, k)
        assert sum(len(p) for p in poly) <= k
        ious.append(iou(encodings.rasterize(poly, 128, 128)[None], d[None])[0])
    assert ious[0] < 0.7 < ious[1] < ious[2] and min(ious[2:]) > 0.97   # (VW is not monotone past 16)
    # the budget goes where the area is: a far dot is dropped before the big square loses a corner
    both = sq.copy()
    both[100, 100] = True
    poly = encodings.polygon_encode(both, 4)
    assert iou(encodings.rasterize(poly, 128, 128)[None], sq[None])[0] == 1.0


def test_box_and_rle():
    rect = np.zeros((40, 30), bool)
    rect[5:17, 9:28] = True
    box = encodings.box_encode(rect)
    assert encodings.box_decode(box, 40, 30).tolist() == rect.tolist()
    d = disc(40, 30, 20, 15, 8)
    filled = encodings.box_decode(encodings.box_encode(d), 40, 30)
    assert (filled >= d).all() and 0.75 < iou(filled[None], d[None])[0] < 0.9    # ~pi / 4 of the box
    from data.jsonl import rle_encode
    assert encodings.rle_tokens(rect) == len(rle_encode(rect)["counts"]) == 2 * 19 + 1   # 19 columns of 1s


def test_rvq_peer_gives_the_same_codes_and_codebooks():
    pytest.importorskip("vector_quantize_pytorch")
    cfg = dict(bench.DEFAULTS, rvq_codes=32, rvq_dim=16, rvq_batches=(48,), rvq_rounds=1, rvq_calls=1)
    out = rvq.measure(cfg, torch.device("cpu"))
    assert out["rvq_codes_agree"] == 1.0
    r = out["rvq"]["batches"][48]
    assert r["codebook_max_diff"] < 1e-4 and r["speed_ratio"] > 0
    # a check that can fail: a peer holding other codebooks disagrees
    from quantizer import ResidualVQ
    ours = ResidualVQ(levels=2, codebook_size=32, dim=16, restarts=False)
    ours.init_codebooks(torch.randn(256, 16))
    peer = rvq.peer_rvq(ours).eval()
    ours.eval()
    z = torch.randn(200, 16)
    assert torch.equal(ours(z)[1], peer(z)[1])
    with torch.no_grad():
        peer.layers[0]._codebook.embed.copy_(torch.randn_like(peer.layers[0]._codebook.embed))
    assert not torch.equal(ours(z)[1], peer(z)[1])


def test_trl_collator_sees_sft_tokens():
    """TRL's vision collator, with the template the sft section gives it, makes the same ids, pixels
    and loss positions as vlm.collate, for multi-turn conversations."""
    pytest.importorskip("trl")
    import sft
    import tiny_vlm
    from benchmarks import sft as sft_section
    from data.tasks import conversations, text_corpus
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    from vlm import collate, tokenize
    cfg = configure(sft.DEFAULTS, sft.PRESETS, [f"--{k}={v}" for k, v in gpu.TINY_VLM.items()])
    images, samples, scenes = gpu.random_code_world(4)
    processor = tiny_vlm.build_processor(cfg, text_corpus([s for _, s in scenes]))
    model = tiny_vlm.build_model(cfg, processor)
    sft.add_mask_tokens(model, processor)
    convs, _ = tokenize(conversations(samples, 5, 0), images, processor, 10 ** 6)
    batch = convs[:3]
    ours, labels = collate(batch, images, processor)
    processor.chat_template = sft_section.training_template()
    theirs = DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True)(
        sft_section.trl_rows(batch, images))
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(labels, theirs["labels"])
    assert (labels != -100).sum() > 0


def test_sft_py_step_lines_are_read(tok_ckpt, tmp_path):
    """The sft section reads sft.py's own step lines: a format change must fail here, not in a
    long benchmark run."""
    from benchmarks import sft as sft_section
    args = [f"--{k}={v}" for k, v in gpu.TINY_VLM.items()] + [
        "--n_train=4", f"--out_dir={tmp_path / 'sft'}", f"--tokenizer_ckpt={tok_ckpt}", "--steps=3", "--eval_n=0",
        "--log_every=1", "--device=cpu"]
    r = sft_section.run_sft_py(args, 3, 1)
    assert r["tok_s"] > 0 and r["ms"] > 0 and len(r["losses"]) == 3


def test_grpo_py_step_line_is_read():
    """The grpo section reads grpo.py's step lines: the line grpo.log_line writes must match."""
    import grpo
    from benchmarks import grpo as grpo_section
    rec = dict(reward=0.25, reward_std=0.1, frac_reward_zero_std=0.5, clip_low=0.0, clip_high=0.01, length=9.5,
               truncated=0.0, kl=0.01, seconds=0.8, gen_seconds=0.2, completions=64)
    line = grpo.log_line([rec], 3, 6, 1e-4, ref=None)
    m = grpo_section.GRPO_LINE.search(line)
    assert m and int(m[1]) == 3 and float(m[2]) == 0.25 and float(m[3]) == 9.5
    assert int(m[4]) == 800 and int(m[5]) == 25 and int(m[6]) == 80


def test_gpu_check_dry_run():
    out = gpu.measure(dict(bench.DEFAULTS, dry_run=True), torch.device("cpu"))["gpu_check"]
    assert out["dry_run"]
    assert out["gpu_tokenizer"]["masks_per_s"] > 0
    assert out["gpu_sft"]["tokens_per_s"] > 0 and out["gpu_sft"]["model_tflops"] > 0
    assert out["gpu_generation"]["completions_per_s"] > 0


def run_bench(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_section_run_merges_into_the_json(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"rvq_speed_ratio": 1.5}))
    p = run_bench("--only=resolution", "--n=2", "--grids=(8,)", f"--out={out}")
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["rvq_speed_ratio"] == 1.5                      # other sections' figures are kept
    assert 0 < res["resolution_reference"]["grids"]["8"]["miou"] < 1
    assert "| 8x8 |" in p.stdout


@pytest.mark.parametrize("args,words", [
    (["--only=nope"], "--only"), (["--sft_steps=2", "--only=sft"], "sft_warmup"),
    pytest.param(["--gpu_check"], "GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU"))])
def test_bad_options_one_line(args, words, tmp_path):
    p = run_bench(*args, f"--out={tmp_path / 'b.json'}")
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr
    assert not (tmp_path / "b.json").exists()
