"""Real checkpoints: the official SAM2.1 layout, a saved Qwen-VL folder, the authors' released tokenizer.

No downloads: every "real" checkpoint is built here from the libraries' own configs (random
weights, real names and shapes) and written in the layout its authors use. SAM2.1 Hiera-T runs
in CI; Hiera-L (the paper's, 224M parameters, ~0.9 GB) only with SAMTOK_BIG_TESTS=1.
"""
import dataclasses
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
from common import UserError, configure  # noqa: E402

BIG = os.environ.get("SAMTOK_BIG_TESTS") == "1"


def sam2_args(size):
    """Our options for a real SAM2.1 size (Hiera-L is exactly the paper preset)."""
    if size == "l":
        return ["--preset=paper"]
    return [f"--sam2_config=configs/sam2.1/sam2.1_hiera_{size}.yaml", "--sam2_overrides=", "--d_model=256",
            "--mlp_dim=2048", "--image_size=1024"]


def official_sam2(size, path):
    """sam2's own build_sam2 from its config file, random init, saved as {"model": state_dict}:
    the layout of the sam2.1_hiera_*.pt files Meta publishes."""
    from sam2.build_sam import build_sam2
    torch.manual_seed(0)
    sam2 = build_sam2(f"configs/sam2.1/sam2.1_hiera_{size}.yaml", ckpt_path=None, device="cpu")
    sd = sam2.state_dict()
    torch.save({"model": sd}, path)
    return sd


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt")
    return path, official_sam2("t", path)

# ---------------------------------------------------------------- (a) official SAM2.1 checkpoints

@pytest.mark.parametrize("size", ["t", pytest.param("l", marks=pytest.mark.skipif(not BIG, reason="SAMTOK_BIG_TESTS=1"))])
def test_official_sam2_layout_loads(size, tiny_sam2, tmp_path):
    """The --sam2_ckpt code path (load_sam2_checkpoint) puts every SAM2 tensor of the file into
    our model, bit for bit, and leaves the new parts (mask encoder, query, codebooks) alone."""
    if size == "t":
        path, sd = tiny_sam2
    else:
        path = str(tmp_path / "sam2.1_hiera_large.pt")
        sd = official_sam2(size, path)
    torch.manual_seed(1)
    model = samtok.SAMTok(configure(T.DEFAULTS, T.PRESETS, sam2_args(size)))
    new_parts = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] not in samtok.SAM2_PARTS}
    samtok.load_sam2_checkpoint(model, path)
    ours = model.state_dict()
    sam2_keys = [k for k in ours if k.split(".")[0] in samtok.SAM2_PARTS]
    assert len(sam2_keys) > 300 and samtok.hiera_size(sd) == size
    assert all(torch.equal(ours[k], sd[k]) for k in sam2_keys)
    assert all(torch.equal(ours[k], v) for k, v in new_parts.items())
    unused = {k.split(".")[0] for k in sd if k not in ours}
    assert unused <= set(samtok.VIDEO_ONLY)                       # only SAM2's video parts stay behind


def test_mismatched_sam2_refused_before_loading(tiny_sam2, tmp_path):
    path, sd = tiny_sam2
    torch.manual_seed(0)
    model = samtok.SAMTok(configure(T.DEFAULTS, T.PRESETS, []))           # the tiny preset's small Hiera
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        samtok.load_sam2_checkpoint(model, path)
    msg = str(e.value)
    assert path in msg and "of another shape" in msg and "nothing was loaded" in msg
    assert "Hiera-t" in msg and "sam2.1_hiera_t.yaml" in msg                 # says what would fit
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # not half-loaded
    # the right architecture with one tensor missing: refused, naming that key
    broken = dict(sd)
    del broken["sam_mask_decoder.iou_token.weight"]
    torch.save({"model": broken}, tmp_path / "broken.pt")
    model = samtok.SAMTok(configure(T.DEFAULTS, T.PRESETS, sam2_args("t")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"1 keys missing \(first: sam_mask_decoder.iou_token.weight\)"):
        samtok.load_sam2_checkpoint(model, str(tmp_path / "broken.pt"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # not a checkpoint at all
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        samtok.load_sam2_checkpoint(model, str(tmp_path / "notes.pt"))
    with pytest.raises(UserError, match="not found"):
        samtok.load_sam2_checkpoint(model, str(tmp_path / "nowhere.pt"))


def test_script_refuses_mismatched_sam2(tiny_sam2, tmp_path):
    args = ["--image_size=64", "--d_model=32", "--mlp_dim=64", "--n_train=4", "--n_val=2", "--n_test=2",
            f"--sam2_ckpt={tiny_sam2[0]}", f"--out_dir={tmp_path / 'o'}"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert tiny_sam2[0] in r.stderr and "nothing was loaded" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")

# ---------------------------------------------------------------- (b) a saved Qwen-VL folder

def test_qwen_vl_folder_loads_through_sft(tmp_path):
    """A Qwen2.5-VL built from its config classes, saved with save_pretrained, comes back through
    vlm.load_pretrained (what sft.py, grpo.py and infer.py call) with the same weights and the same logits."""
    import sft
    import tiny_vlm
    import vlm
    from data import iter_scenes
    from data.tasks import text_corpus
    tiny = ["--hidden_size=64", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--intermediate_size=128",
            "--vision_hidden=32", "--vision_depth=1", "--vision_heads=2", "--vision_intermediate=64", "--bpe_vocab=400",
            "--model_type=qwen2_5_vl"]
    cfg = configure(sft.DEFAULTS, sft.PRESETS, tiny)
    torch.manual_seed(0)
    processor = tiny_vlm.build_processor(cfg, text_corpus([s for _, s in iter_scenes("train", 10)]))
    model = tiny_vlm.build_model(cfg, processor).eval()
    model.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    assert sft.load_pretrained is vlm.load_pretrained
    loaded, proc2 = vlm.load_pretrained(str(tmp_path / "qwen"), cfg)
    a, b = model.state_dict(), loaded.eval().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration" and len(proc2.tokenizer) == len(processor.tokenizer)
    ids = torch.randint(0, len(processor.tokenizer), (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load a Qwen-VL model"):
        vlm.load_pretrained(str(tmp_path / "junk"), cfg)

# ---------------------------------------------------------------- (c) the authors' released tokenizer

def released_state_dict(sam2_sd, d=256, mlp=2048, K=256, levels=2, queries=1):
    """A state dict with the names and shapes of the authors' mask_tokenizer_256x2.pth (their
    VQ_SAM2 in bytedance/Sa2VA projects/samtok), random values. Their SAM2Base sits under
    model.sam2_model. (the sam2 package's names, video parts included); their mask encoder is a
    SAM two-way transformer plus `mask_tokens`; each codebook is an nn.Embedding of K + 1 rows
    (row K is the padding index) with EMA buffers."""
    from sam2.modeling.sam.transformer import TwoWayTransformer
    g = torch.Generator().manual_seed(3)
    sd = {"model.sam2_model." + k: v for k, v in sam2_sd.items()}
    enc = TwoWayTransformer(depth=2, embedding_dim=d, mlp_dim=mlp, num_heads=8).state_dict()
    sd.update({"model.sam2_model.sam_mask_encoder.transformer." + k: torch.randn(v.shape, generator=g) for k, v in enc.items()})
    sd["model.sam2_model.sam_mask_encoder.mask_tokens.weight"] = torch.randn(queries, d, generator=g)
    for level in range(levels):
        w = torch.randn(K + 1, d, generator=g)
        w[K] = 0                                                   # padding_idx row
        sd[f"quantizer.codebooks.{level}.weight"] = w
        sd[f"quantizer.codebooks.{level}.cluster_size_ema"] = torch.rand(K, generator=g) * 10
        sd[f"quantizer.codebooks.{level}.embed_ema"] = torch.randn(K, d, generator=g)
    return sd


def test_released_tokenizer_converts(tiny_sam2, tmp_path):
    sam2_path, sam2_sd = tiny_sam2
    sd = released_state_dict(sam2_sd)
    path = str(tmp_path / "mask_tokenizer_256x2.pth")
    torch.save({k: v.to(torch.bfloat16) if k.startswith("quantizer") else v for k, v in sd.items()}, path)
    model = samtok.load_tokenizer(path)                            # what infer.py / sft.py call
    bf = lambda k: sd[k].to(torch.bfloat16).float()
    assert model.config.sam2_config.endswith("sam2.1_hiera_t.yaml") and model.config.image_size == 1024
    assert model.checkpoint == path
    ours = model.state_dict()
    P = "model.sam2_model."
    assert torch.equal(ours["query.weight"], sd[P + "sam_mask_encoder.mask_tokens.weight"])
    enc = [k for k in sd if k.startswith(P + "sam_mask_encoder.transformer.")]
    assert len(enc) > 50 and all(torch.equal(ours["mask_encoder." + k.split("transformer.", 1)[1]], sd[k]) for k in enc)
    assert all(torch.equal(ours[k], sam2_sd[k]) for k in ours if k.split(".")[0] in samtok.SAM2_PARTS)
    for level in range(2):
        assert torch.equal(ours["rvq.codebook"][level], bf(f"quantizer.codebooks.{level}.weight")[:256])   # padding row dropped
        assert torch.equal(ours["rvq.ema_count"][level], bf(f"quantizer.codebooks.{level}.cluster_size_ema"))
        assert torch.equal(ours["rvq.ema_sum"][level], bf(f"quantizer.codebooks.{level}.embed_ema"))
    assert bool(ours["rvq.initialized"])

    # the converted weights run: at 64 px (the weights do not depend on the image size) encode -> decode,
    # and the codes are the nearest entries of *their* codebooks, level 2 on the residual
    config, conv = samtok.convert_released(torch.load(path), path)
    assert isinstance(config, samtok.SAMTokConfig) and config == model.config
    small = samtok.SAMTok(dataclasses.replace(config, image_size=64)).eval()
    samtok.load_checked(small, conv, path, None)
    img = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    masks = np.zeros((2, 60, 90), bool)
    masks[0, 10:30, 20:50] = True
    masks[1, 35:55, 5:80] = True
    codes = small.encode(img, masks)
    with torch.no_grad():
        embed, _ = small.image_embeddings(small.image_features(small.preprocess(img[None])))
        S = 64
        prompt = torch.nn.functional.interpolate(torch.as_tensor(masks).float()[:, None], size=(16, 16), mode="bilinear",
                                                 antialias=True)
        z = small.encode_latent(embed.expand(2, -1, -1, -1), prompt, samtok.boxes_of(masks) * torch.tensor([S / 90, S / 60] * 2))
        books = [bf(f"quantizer.codebooks.{l}.weight")[:256] for l in range(2)]
        c1 = torch.cdist(z, books[0]).argmin(1)
        c2 = torch.cdist(z - books[0][c1], books[1]).argmin(1)
    assert torch.equal(codes, torch.stack([c1, c2], 1))
    assert small.decode(img, codes).shape == (2, 60, 90)


def test_released_tokenizer_refusals(tiny_sam2, tmp_path):
    sam2_path, sam2_sd = tiny_sam2
    # several query tokens (their MASK_TOKENIZER_NUM_MASK_TOKEN > 1) + the MLP that merges them
    sd = released_state_dict(sam2_sd, queries=4)
    sd["concate_mask_embeds.1.weight"] = torch.zeros(256, 1024)
    torch.save(sd, tmp_path / "multi.pth")
    with pytest.raises(UserError, match="4 query tokens"):
        samtok.load_tokenizer(str(tmp_path / "multi.pth"))
    # an unknown key: not silently ignored
    sd = released_state_dict(sam2_sd)
    sd["model.sam2_model.language_proj.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(UserError, match="language_proj.weight has no counterpart"):
        samtok.load_tokenizer(str(tmp_path / "other.pth"))
    # a file without SAM2's image encoder needs the SAM2.1 checkpoint beside it
    sd = {k: v for k, v in released_state_dict(sam2_sd).items() if ".image_encoder." not in k}
    torch.save(sd, tmp_path / "noenc.pth")
    with pytest.raises(UserError, match="no SAM2 image encoder"):
        samtok.load_tokenizer(str(tmp_path / "noenc.pth"))
    model = samtok.load_tokenizer(str(tmp_path / "noenc.pth"), sam2_ckpt=sam2_path)
    assert torch.equal(model.state_dict()["image_encoder.trunk.patch_embed.proj.weight"],
                       sam2_sd["image_encoder.trunk.patch_embed.proj.weight"])
    # a mask encoder of another width than the SAM2 it sits on: refused before loading
    sd = released_state_dict(sam2_sd)
    sd["model.sam2_model.sam_mask_encoder.transformer.layers.0.norm1.weight"] = torch.ones(128)
    torch.save(sd, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="mask_encoder.layers.0.norm1.weight"):
        samtok.load_tokenizer(str(tmp_path / "wrong.pth"))
    # neither ours nor theirs
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a tokenizer checkpoint"):
        samtok.load_tokenizer(str(tmp_path / "x.pt"))
