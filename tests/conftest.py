"""Shared test fixtures of Stages 2-3 and inference: a tiny random SAMTok checkpoint, six train
scenes of the shapes world with their samples, and a tiny config-built Qwen2.5-VL."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sft  # noqa: E402
import tiny_vlm  # noqa: E402
import tokenizer as T  # noqa: E402
import vlm  # noqa: E402
from common import atomic_save, configure  # noqa: E402
from data import iter_scenes  # noqa: E402
from data.tasks import text_corpus  # noqa: E402
from samtok import SAMTok, load_tokenizer  # noqa: E402

# A VLM small enough to build in a fraction of a second and step in ~50 ms.
TINY = ["--hidden_size=64", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--intermediate_size=128",
        "--vision_hidden=32", "--vision_depth=1", "--vision_heads=2", "--vision_intermediate=64", "--bpe_vocab=600",
        "--vision_pretrain_steps=2", "--patch_size=16"]


@pytest.fixture(scope="module")
def tok_ckpt(tmp_path_factory):
    """A tiny random SAMTok checkpoint (64 px, 32-d latent): its codes are arbitrary but fixed."""
    torch.manual_seed(0)
    cfg = configure(T.DEFAULTS, T.PRESETS, ["--image_size=64", "--d_model=32", "--mlp_dim=64"])
    m = SAMTok(cfg).eval()
    m.rvq.init_codebooks(torch.randn(512, 32))
    path = str(tmp_path_factory.mktemp("tok") / "ckpt.pt")
    atomic_save({"stage": "tokenizer", "config": m.config.to_dict(), "model": m.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def world(tok_ckpt, tmp_path_factory):
    """6 train scenes -> images, samples (with codes from the tiny tokenizer), scenes, cfg."""
    out = str(tmp_path_factory.mktemp("sft"))
    cfg = configure(sft.DEFAULTS, sft.PRESETS, TINY + [f"--tokenizer_ckpt={tok_ckpt}", f"--out_dir={out}"])
    mask_tok = load_tokenizer(tok_ckpt)
    images, samples, scenes, _ = vlm.load_world("train", 6, mask_tok, cfg, ("refer", "caption", "gcg"), cfg["extra_none"])
    return images, samples, scenes, cfg


def build(cfg, **over):
    cfg = dict(cfg, **over)
    scenes = [s for _, s in iter_scenes("train", 20)]
    torch.manual_seed(0)
    processor = tiny_vlm.build_processor(cfg, text_corpus(scenes))
    return tiny_vlm.build_model(cfg, processor).eval(), processor


def teach(model, batch, labels, steps):
    """AdamW on one batch until the model says its answers (the loss per answer token) -> the last loss."""
    n = (labels[:, 1:] != -100).sum()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = sft.token_loss(model, batch, labels, torch.tensor([0]))[0] / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()
