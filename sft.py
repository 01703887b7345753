"""
SAMTok Stage 2: supervised fine-tuning of a vision-language model that writes masks as words.

"We represent any mask with two words." The Stage-1 tokenizer (tokenizer.py) turns any region
mask into two codes, written <|mt_start|><|mt_00xx|><|mt_0yyy|><|mt_end|>. Here a Qwen-VL model
gets those 514 words as ordinary new vocabulary (PAPER.md section 2) and learns, with nothing but
next-token cross-entropy on the assistant's tokens, the three tasks of section 3: referring /
generalized segmentation (phrase -> the mask words of every target, sorted by box centre, or
"No target."), region captioning (mask words in the prompt -> a caption) and grounded
conversation (<|object_ref_start|>phrase<|object_ref_end|> followed by the phrase's mask words).
There is no mask decoder and no mask loss in the VLM: at test time the generated words go back
through the tokenizer's decoder, and the masks are scored against the ground truth.

The embedded default (preset tiny) builds a small Qwen2.5-VL from its config classes, with a BPE
tokenizer trained here on the synthetic world's text and wrapped in the real Qwen-VL processor,
so that everything it saves loads with plain transformers (AutoProcessor /
AutoModelForImageTextToText). The paper preset starts from a released Qwen2.5-VL instead.

Run it (the Stage-1 tokenizer first: python tokenizer.py):
    python sft.py                                         # CPU, preset tiny, ~14 minutes on 2 cores
    python sft.py --device=cuda                           # one GPU
    torchrun --standalone --nproc_per_node=8 sft.py --preset=paper
    # two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        sft.py --preset=paper
Options are --key=value (see DEFAULTS): --model_type=qwen3_vl builds a tiny Qwen3-VL instead,
--base_model=Qwen/Qwen2.5-VL-7B-Instruct (or a local folder) starts from a real model,
--fsdp=true shards with FSDP2, --resume=true continues from out_dir/model.
Writes out_dir/model (save_pretrained: model + processor + optimizer state), out_dir/metrics.json
and out_dir/gallery.png (test predictions over their images).
"""

import hashlib
import json
import math
import os
import random
import shutil
import time
import zlib
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import UserError, configure, die, init_distributed, lr_at, overlay, stop_early, write_json
from tokenizer import codes_to_text, iou, load_tokenizer, mask_tokens, text_to_codes

# ----------------------------------------------------------------------------- config
DEFAULTS = dict(
    out_dir="out/sft",
    device="auto",              # auto | cpu | cuda
    seed=0,
    # the VLM: a released checkpoint, or (empty) a small one built from the config classes
    base_model="",              # hub id or local folder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    model_type="qwen2_5_vl",    # config-built family: qwen2_5_vl | qwen3_vl
    hidden_size=192, n_layers=3, n_heads=3, n_kv_heads=1, intermediate_size=512, rope_theta=1e4,
    vision_hidden=96, vision_depth=2, vision_heads=2, vision_intermediate=192, patch_size=16,
    init_std=0.02,              # config-built: initializer_range of the weights
    tie_embeddings=False,       # Qwen2.5-VL-3B ties the LM head to the input embeddings, 7B does not
    vocab_pad=64,               # config-built: embedding rows padded to a multiple (Qwen: 151,936)
    bpe_vocab=1000,             # BPE vocabulary (256 bytes + merges) learned on the world's text
    image_size=128,             # images resized to image_size^2 px: (128/16)^2 / 2^2 = 16 visual tokens
    # Stage 1
    tokenizer_ckpt="out/tokenizer/ckpt.pt",
    # data: the synthetic shapes world by default, or any data.open_dataset spec (a jsonl folder,
    # coco:..., refcoco:..., grefcoco:..., sa1b:...; comma-joined for a mixture)
    data="shapes",
    n_train=3000,               # scenes; every scene gives ~13 samples over the tasks
    tasks="refer,caption,gcg",
    extra_none=2,               # shapes world: this many more no-target phrases per training scene
    turns=4,                    # turns (samples of one image and task) per training conversation; 1 = single-turn
    max_len=1024,               # longer conversations are dropped (and counted), never truncated
    # optimisation
    steps=8000, batch_size=10, grad_accum=1,   # conversations per micro-batch per process
    lr=2e-3, min_lr_ratio=0.1, warmup_frac=0.05, weight_decay=0.01, beta2=0.95, grad_clip=1.0,
    freeze_vision=False,        # paper: vision tower frozen, projector (merger) + LLM trained
    # config-built model only: a short dense pretraining of the random vision tower (see
    # pretrain_vision), after which the tower, merger included, stays frozen during SFT
    vision_pretrain_steps=1000, vision_pretrain_batch=32, vision_pretrain_lr=4e-3,
    word_init="codebook",       # new mask-word rows: "mean" (the paper's rule) | "codebook" (config-built model)
    fsdp=False,                 # FSDP2 (fully_shard) instead of DDP
    grad_checkpointing=False,
    bucket_pool=64,             # length bucketing: sort pools of bucket_pool micro-batches by length
    # bookkeeping
    log_every=50, ckpt_every=500, resume=False,
    stop_after=0,               # stop after this many steps of this run (simulates an interruption)
    eval_n=100,                 # test scenes for the final evaluation (0: none)
    eval_batch=64,
    peak_tflops=989.0,          # the GPU's dense bf16 peak (H100: 989), for the MFU in the step line
)
PRESETS = {
    "tiny": {},
    "paper": dict(base_model="Qwen/Qwen2.5-VL-3B-Instruct", image_size=448, freeze_vision=True, fsdp=True, word_init="mean",
                  grad_checkpointing=True, n_train=200_000, steps=20_000, batch_size=4, grad_accum=8,
                  lr=2e-5, min_lr_ratio=0.0, warmup_frac=0.03, weight_decay=0.0, beta2=0.999,
                  max_len=2048, log_every=10, ckpt_every=1000, eval_n=500, eval_batch=32),
}
# paper: global batch 256 = batch_size 4 x grad_accum 8 x 8 GPUs; AdamW lr 2e-5, cosine, bf16

# ----------------------------------------------------------------------------- the model
# Qwen's special tokens, in Qwen's order; the config-built tokenizer has exactly these.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
# Qwen-VL's chat template, less tools and videos: <|im_start|>role\n ... <|im_end|>\n per message,
# an image is <|vision_start|><|image_pad|><|vision_end|>. Like Qwen3-VL's (unlike Qwen2.5-VL's) it
# adds no default system turn: ~10 fewer tokens a sample, which is ~20% of a CPU step here.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_processor(cfg, corpus):
    """A Qwen-VL processor for the config-built model: a byte-level BPE with Qwen's own
    normalizer and pre-tokenizer, learned on the world's text, inside the real Qwen2Tokenizer
    class, plus Qwen's image processor fixed at image_size^2 pixels."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    # Same pipeline as Qwen's tokenizer.json (NFC, Qwen's split regex, byte-level BPE), so the
    # added mask words and special tokens behave exactly as they would on a released model.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=cfg["bpe_vocab"], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    learned = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL], special_tokens=True)
    # min = max pixels = image_size^2: every image becomes image_size x image_size, so every image
    # has the same number of visual tokens ((S / patch)^2 patches, merged 2 x 2 by the projector)
    S, p = cfg["image_size"], cfg["patch_size"]
    image_proc = Qwen2VLImageProcessor(patch_size=p, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": S * S, "longest_edge": S * S})
    if cfg["model_type"] == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Processor, Qwen3VLVideoProcessor as VideoProcessor
    else:
        from transformers import Qwen2_5_VLProcessor as Processor, Qwen2VLVideoProcessor as VideoProcessor
    return Processor(image_processor=image_proc, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                     video_processor=VideoProcessor(patch_size=p, merge_size=2, temporal_patch_size=2))


def build_model(cfg, processor):
    """A small Qwen2.5-VL (or Qwen3-VL) from its config classes: the same modules as the
    released models (ViT with 2D RoPE, 2x2 patch merger = the projector, M-RoPE decoder),
    only narrower and shallower. The embedding matrix is padded past the tokenizer, as in Qwen."""
    tid = processor.tokenizer.convert_tokens_to_ids
    H, heads = cfg["hidden_size"], cfg["n_heads"]
    # M-RoPE splits each head's rotary frequencies over (time, height, width); Qwen2.5-VL-7B
    # uses [16, 24, 24] of 64, we keep the proportions. rope_theta 1e4 instead of Qwen's 1e6:
    # conversations here are a few hundred tokens, not 32k (1e6 measured the same: mIoU 0.403).
    half = H // heads // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    rows = math.ceil(len(processor.tokenizer) / cfg["vocab_pad"]) * cfg["vocab_pad"]
    text = dict(vocab_size=rows, hidden_size=H, intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["n_layers"], num_attention_heads=heads, num_key_value_heads=cfg["n_kv_heads"],
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=cfg["tie_embeddings"],
                initializer_range=cfg["init_std"],
                bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
                rope_parameters=dict(rope_type="default", rope_theta=float(cfg["rope_theta"]), mrope_section=section))
    vision = dict(depth=cfg["vision_depth"], hidden_size=cfg["vision_hidden"], num_heads=cfg["vision_heads"],
                  intermediate_size=cfg["vision_intermediate"], patch_size=cfg["patch_size"], spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=H, initializer_range=cfg["init_std"])
    ids = dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
               vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))
    if cfg["model_type"] == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
        # window attention only pays off on large images: every block attends globally here
        vision.update(window_size=cfg["image_size"], fullatt_block_indexes=list(range(cfg["vision_depth"])))
    elif cfg["model_type"] == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config, Qwen3VLForConditionalGeneration as Model
        text.update(head_dim=H // heads)
        text["rope_parameters"]["mrope_interleaved"] = True
        # learned position table of a (S/p) x (S/p) grid; DeepStack feeds block 0's features to the LLM too
        vision.update(num_position_embeddings=(cfg["image_size"] // cfg["patch_size"]) ** 2, deepstack_visual_indexes=[0])
    else:
        raise UserError(f"--model_type={cfg['model_type']!r}: choose qwen2_5_vl or qwen3_vl")
    model = Model(Config(text_config=text, vision_config=vision, tie_word_embeddings=cfg["tie_embeddings"], **ids))
    # generation stops at the end of the assistant's turn, as with a released Qwen-VL-Instruct
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    return model


def load_pretrained(path, cfg):
    """A released (or previously saved) Qwen-VL and its processor, through the same Auto classes a
    user would call. The image processor is pinned to image_size^2 pixels: fixed-size images give
    a fixed number of visual tokens, which the data pipeline relies on."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a Qwen-VL model from {path!r}: {str(e).splitlines()[0]}")
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    if cfg["image_size"] % factor:
        raise UserError(f"--image_size={cfg['image_size']} must be a multiple of patch x merge = {factor} for {path}")
    ip.size = {"shortest_edge": cfg["image_size"] ** 2, "longest_edge": cfg["image_size"] ** 2}
    return model, processor


def add_mask_tokens(model, processor):
    """Vocabulary surgery (PAPER.md section 2): the 514 mask words become ordinary tokens
    (non-special, unnormalized, no strip), the embedding matrix grows to hold them, and every new
    row - input embedding and LM head, tied or not - starts at mean + 0.02 * N(0, 1) * std of the
    old real rows, per dimension. Returns the words' ids. Idempotent: words already in the
    vocabulary (a resumed or reloaded model) keep their trained rows."""
    from transformers import AddedToken
    tok = processor.tokenizer
    words = mask_tokens()
    old_len = len(tok)
    tok.add_tokens([AddedToken(w, special=False, normalized=False, lstrip=False, rstrip=False) for w in words])
    ids = tok.convert_tokens_to_ids(words)
    new = [i for i in ids if i >= old_len]
    # Pitfall: Qwen-VL matrices are padded (3B: 151,936 rows for 151,665 tokens), so
    # resize_token_embeddings(len(tokenizer)) can SHRINK them. Never shrink: grow only if needed.
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    # Why not resize_token_embeddings' own init: it leaves rows inside the old padding as they
    # were (random or zero) and, with mean_resizing, samples from the full covariance (slow at
    # 150k x 3584). The paper's rule is per dimension and cheap.
    with torch.no_grad():
        mats = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings().weight
        if head.data_ptr() != mats[0].data_ptr():     # untied: the LM head gets its own statistics
            mats.append(head)
        for W in mats:
            # Statistics of the real rows only (ids < old_len): padding rows were never trained.
            # New ids may land inside the old padding: those rows are overwritten here as well.
            real = W[:old_len].float()
            mean, std = real.mean(0), real.std(0)
            W[new] = (mean + 0.02 * torch.randn(len(new), W.shape[1], device=W.device) * std).to(W.dtype)
    # Each word must be exactly one id both ways, or the model could never say a mask in 4 tokens.
    for w, i in zip(words, ids):
        if tok.encode(w, add_special_tokens=False) != [i] or tok.decode([i]) != w:
            raise RuntimeError(f"mask word {w} does not round-trip through the tokenizer (id {i})")
    sample = "a" + codes_to_text([[3, 7], [255, 0]]) + " b"
    if tok.decode(tok.encode(sample, add_special_tokens=False)) != sample:
        raise RuntimeError("mask words inside text do not round-trip through the tokenizer")
    return ids


def init_words_from_codebook(model, word_ids, codebook):
    """word_init=codebook (config-built model): the rows of the 512 code words, input embeddings
    and LM head, start as a fixed random projection of the tokenizer's codebook vectors, scaled to
    the text rows' spread. Codes that paint similar masks then start with similar rows, so what
    the model learns about one code carries over to its neighbours; the paper's mean + noise rule
    (for a released model whose rows mean something) makes all 512 start alike."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for level, cb in enumerate(codebook):                          # (256, D) a level
            # one projection a level for both matrices: with an untied LM head, a word's output row
            # then points where its input row does, so "copy this word's embedding" writes it
            e = cb @ torch.randn(cb.shape[-1], model.config.text_config.hidden_size, generator=g).to(cb)
            e = (e - e.mean(0)) / e.std()
            for W in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                W[word_ids[256 * level:256 * (level + 1)]] = (e * W[:int(min(word_ids))].std()).to(W)


def pretrain_vision(model, processor, images, scenes, codes, codebook, cfg, log=print):
    """A stand-in for the pretraining every released ViT has, for the config-built model only.
    Measured without it: the random tower's visual tokens collapse to one large constant vector
    within a few hundred SFT steps (an attention sink) and the model answers the same whatever
    the image (equal loss with shuffled images). Here the tower learns, in ~2 minutes, to say for
    each visual token (a 32 x 32 px cell after the 2 x 2 merger) what lies in each 4 x 4 px
    sub-cell (colour and shape class, or just object / background outside the shapes world), and
    to regress the Stage-1 latent e1 + e2 of the object covering most of the token: the geometry
    the mask words encode. A linear head reads the merger's output; it is thrown away after.
    How long matters (measured on test scenes: the level-1 code nearest to the read-out latent,
    decoded with the true level-2 code, against the object's mask): 300 steps give IoU 0.54,
    1,000 steps 0.74 (0.76 at lr 4e-3, the default), 2,000 steps 0.76."""
    vis = vision_tower(model)
    ip = processor.image_processor
    S, m, cell = images.shape[1], ip.patch_size * ip.merge_size, 4
    g, k = S // m, m // cell
    attrs = all("color" in o and "shape" in o for _, sc in scenes for o in sc["objects"])
    from data import COLORS, SHAPES
    n_col, n_shp = (len(COLORS) + 1, len(SHAPES) + 1) if attrs else (2, 1)
    cells, latents, has = [], [], []
    for (_, sc), c in zip(scenes, codes):
        ms = torch.as_tensor(np.asarray(sc["masks"])).float()[:, None]
        ms = F.interpolate(ms, size=(S, S), mode="nearest")[:, 0]                     # (N, S, S)
        cov = ms.view(len(ms), S // cell, cell, S // cell, cell).mean((2, 4))       # (N, S/4, S/4)
        top = cov.argmax(0)
        fg = cov.max(0).values > 0.5
        col = torch.tensor([1 + list(COLORS).index(o["color"]) if attrs else 1 for o in sc["objects"]])[top]
        shp = torch.tensor([1 + list(SHAPES).index(o["shape"]) if attrs else 0 for o in sc["objects"]])[top]
        lab = torch.stack([col * fg, shp * fg], -1)                                  # (S/4, S/4, 2)
        cells.append(lab.view(g, k, g, k, 2).permute(0, 2, 1, 3, 4).reshape(g * g, k * k, 2))
        tok_cov = ms.view(len(ms), g, m, g, m).mean((2, 4)).flatten(1)              # (N, g*g)
        z = codebook[0][c[:, 0].long()] + codebook[1][c[:, 1].long()]
        best = tok_cov.max(0)
        latents.append(z[best.indices]), has.append(best.values > 0.15)
    cells, latents, has = torch.cat(cells), torch.cat(latents), torch.cat(has)
    latents = latents / latents.pow(2).mean().sqrt()
    head = torch.nn.Linear(vis.merger.mlp[-1].out_features, k * k * (n_col + n_shp) + latents.shape[1])
    params = list(vis.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["vision_pretrain_lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps, t0 = cfg["vision_pretrain_steps"], time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (cfg["vision_pretrain_batch"],), generator=gen)
        px = ip(images=list(images[idx.numpy()]), return_tensors="pt")
        out = head(vis(px["pixel_values"], grid_thw=px["image_grid_thw"]).pooler_output)
        tok = (idx[:, None] * g * g + torch.arange(g * g)).flatten()
        logits = out[:, :-latents.shape[1]].reshape(-1, k * k, n_col + n_shp)
        loss = F.cross_entropy(logits[..., :n_col].flatten(0, 1), cells[tok, :, 0].flatten())
        if n_shp > 1:
            loss = loss + F.cross_entropy(logits[..., n_col:].flatten(0, 1), cells[tok, :, 1].flatten())
        h = has[tok]
        loss = loss + (out[:, -latents.shape[1]:][h] - latents[tok][h]).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, cfg["vision_pretrain_lr"], 0.05, 0.1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"vision pretraining {step + 1}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f} s")


def set_trainable(model, cfg):
    """What trains: the LLM, and of the vision tower what the config says. freeze_vision (the
    paper) freezes the tower but trains its merger, the projector. tower_frozen (set by sft.py
    for a config-built tower after pretrain_vision, and saved with the checkpoint, so grpo.py
    keeps it) freezes the whole tower, merger included: trained by the LM's gradient from the
    start, its visual tokens collapse to a constant (see pretrain_vision)."""
    for name, p in vision_tower(model).named_parameters():
        p.requires_grad = not cfg.get("tower_frozen") and (not cfg["freeze_vision"] or "merger" in name)


def adamw(params, cfg):
    """AdamW as in the paper; no weight decay on norms and biases (1-d), the usual practice."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(0.9, cfg["beta2"]))


def vision_tower(model):
    return model.model.visual


def decoder_layers(model):
    return model.model.language_model.layers

# ----------------------------------------------------------------------------- data
# A few paraphrases per task (PAPER.md section 3 gives the first of each), so the model learns
# the task, not one string. The choice is a pure function of the scene seed.
REFER_PROMPTS = ("Please segment {} in this image.", "Segment {}.", "Can you segment {} in the image?",
                 "Where is {}? Answer with its mask.", "Give the mask of {}.")
CAPTION_PROMPTS = ("Describe the region {} in detail.", "What is in the region {}?",
                   "Please describe the region {} briefly.")
GCG_PROMPTS = ("Please describe the image and segment every object you mention.",
               "Describe this image, with a mask for each object.",
               "What is in this image? Ground each object with its mask.")
NO_TARGET = "No target."


def scene_samples(seed, scene, codes, tasks):
    """Every SFT sample of one scene: dicts with task, prompt (user text), answer (assistant text)
    and what the evaluation needs. codes (N, 2): the tokenizer's codes of the scene's masks, so
    the target words are exactly what the Stage-1 encoder says for each ground-truth mask."""
    rng = random.Random(seed)
    box = scene["boxes"]
    centre = (box[:, :2] + box[:, 2:]) / 2
    out = []
    if "refer" in tasks:
        for ref in scene.get("refs", []):
            # several targets are written in a fixed order, sorted by box centre (x, then y),
            # so the answer is a function of the image, not of annotation order
            targets = sorted(ref["targets"], key=lambda i: (centre[i, 0], centre[i, 1]))
            # generalized referring (GRES): zero, one or many targets; "No target." is an answer
            # to learn like any other, and what N-acc measures
            answer = "".join(codes_to_text(codes[i]) for i in targets) if targets else NO_TARGET
            out.append(dict(task="refer", kind=ref["kind"], seed=seed, phrase=ref["text"], targets=targets,
                            prompt=rng.choice(REFER_PROMPTS).format(ref["text"]), answer=answer))
    if "caption" in tasks:
        # region captioning turns the words around: the mask is in the prompt, the text is the answer
        for i, caption in enumerate(scene.get("captions", [])):
            out.append(dict(task="caption", seed=seed, obj=scene["objects"][i], answer=caption,
                            prompt=rng.choice(CAPTION_PROMPTS).format(codes_to_text(codes[i]))))
    if "gcg" in tasks and scene.get("grounded", {}).get("text"):     # COCO / SA-1B scenes have no grounded text
        # grounded conversation: each grounded phrase wrapped in object_ref tokens, then its mask words
        g, parts, last = scene["grounded"], [], 0
        for a, b, i in g["spans"]:
            parts += [g["text"][last:a], REF_START, g["text"][a:b], REF_END, codes_to_text(codes[i])]
            last = b
        out.append(dict(task="gcg", seed=seed, prompt=rng.choice(GCG_PROMPTS), answer="".join(parts) + g["text"][last:]))
    return out


def absent_refs(seed, scene, n):
    """n more no-target phrases for a training scene of the shapes world, drawn as the world draws
    its one a scene (data.shapes.absent_attrs), none repeating a phrase the scene already has."""
    from data.shapes import absent_attrs, ref_text
    objs = scene["objects"]
    if not objs or not all("color" in o and "shape" in o for o in objs):
        return []
    rng, out = np.random.default_rng(seed + 1), []
    seen = {r["text"] for r in scene["refs"]}
    for _ in range(20 * n):             # bounded: a scene could in principle leave too few unseen phrases
        if len(out) == n or (attrs := absent_attrs(rng, objs)) is None:
            break
        if (text := ref_text(attrs)) not in seen:
            seen.add(text)
            out.append({"text": text, "targets": [], "kind": "none", "attrs": attrs})
    return out


def text_corpus(scenes):
    """What the config-built BPE learns from: the world's phrases, captions, grounded texts and
    the prompt templates (mask words excluded: they are added to the vocabulary whole)."""
    fixed = ["system\n", "user\n", "assistant\n", NO_TARGET, *GCG_PROMPTS, *[p.format("") for p in CAPTION_PROMPTS]]
    texts = [p.format(r["text"]) for s in scenes for r in s.get("refs", []) for p in REFER_PROMPTS]
    # grounded phrases also stand alone (after <|object_ref_start|>, without their leading space)
    grounded = [s.get("grounded", {"text": "", "spans": []}) for s in scenes]
    phrases = [g["text"][a:b] for g in grounded for a, b, _ in g["spans"]]
    return fixed * 50 + texts + phrases + [c for s in scenes for c in s.get("captions", [])] + [g["text"] for g in grounded]


def file_hash(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scene_codes(tok, cfg, split, scenes):
    """The tokenizer's codes of every mask of (seed, scene) pairs, encoded once and cached on
    disk under a key made of the tokenizer checkpoint's content hash and the seeds."""
    seeds = [seed for seed, _ in scenes]
    key = hashlib.sha1(f"{file_hash(cfg['tokenizer_ckpt'])}|{cfg.get('data', 'shapes')}|{split}|{seeds}".encode())
    path = os.path.join(cfg["out_dir"], f"codes_{key.hexdigest()[:12]}.pt")
    if os.path.exists(path):
        return torch.load(path)
    t0 = time.time()
    codes = [tok.encode(s["image"], s["masks"]).cpu().short() for _, s in scenes]
    os.makedirs(cfg["out_dir"], exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(codes, tmp)
    os.replace(tmp, path)
    print(f"encoded the masks of {len(scenes)} {split} scenes with the tokenizer in {time.time() - t0:.0f} s -> {path}")
    return codes


def chat_parts(processor, image):
    """The chat template's text around the user's and the assistant's words, found by rendering
    a two-turn conversation with marker strings once (instead of the template per sample):
    first = up to the first user text (the image placeholder expanded to its visual tokens,
    as the processor expands it: every image is image_size^2 px, so has the same count),
    ask = from a user text to the assistant's reply, next = from the end of a reply
    (after its <|im_end|>) to the next user text."""
    a, b, c = "\x00", "\x01", "\x02"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": a}]},
            {"role": "assistant", "content": b},
            {"role": "user", "content": [{"type": "text", "text": c}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    first, rest = text.split(a)
    ask, rest = rest.split(b)
    nxt, ask2 = rest.split(c)
    eos = processor.tokenizer.eos_token
    if ask != ask2 or not nxt.startswith(eos):
        raise UserError("the processor's chat template is not Qwen-style (<|im_start|>role ... <|im_end|>)")
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    n_img = int(grid.prod()) // processor.image_processor.merge_size ** 2
    return first.replace(processor.image_token, processor.image_token * n_img), ask, nxt[len(eos):]


def tokenize(convs, images, processor, max_len):
    """Conversations (lists of turns about one image) -> token ids and which of them carry the
    loss: exactly the assistant's replies, each with its closing <|im_end|> (so the model learns
    to stop); system, user and image tokens do not. n_prompt = where the first reply starts (a
    one-turn conversation's prompt, for generation). A conversation over max_len is dropped and
    counted: cutting it would cut image tokens (the model then breaks) or a reply (half a mask)."""
    tok = processor.tokenizer
    first, ask, nxt = chat_parts(processor, images[0])
    pieces = []
    for conv in convs:
        for k, turn in enumerate(conv):
            pieces += [(first if k == 0 else nxt) + turn["prompt"] + ask, turn["answer"] + tok.eos_token]
    ids = iter(tok(pieces, add_special_tokens=False)["input_ids"])
    kept, dropped = [], 0
    for conv in convs:
        seq, lab = [], []
        for _ in conv:
            p, a = next(ids), next(ids)
            seq += p + a
            lab += [False] * len(p) + [True] * len(a)
        if len(seq) > max_len:
            dropped += 1
            continue
        kept.append(dict(turns=conv, img=conv[0]["img"], ids=seq, lab=lab, n_prompt=lab.index(True)))
    return kept, dropped


def conversations(samples, turns, seed):
    """The samples of each image and task in random order, cut into conversations of up to
    `turns` turns (LLaVA-style multi-turn data: the image and the prompt overhead are paid once
    for several answers). No answer may be copied from the context: a conversation holds one
    task (a region caption's prompt or a grounded description holds the very mask words a later
    referring answer needs), and its referring turns have disjoint targets (two phrases for one
    object, "the red circle" then "the circle", would make the second answer a copy)."""
    groups = {}
    for s in samples:
        groups.setdefault((s["img"], s["task"]), []).append(s)
    rng = random.Random(seed)
    convs = []
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        mine = []                       # [turns, their targets]: each sample joins the first that fits
        for s in group:
            t = set(s.get("targets", ()))
            home = next((c for c in mine if len(c[0]) < turns and not t & c[1]), None)
            if home is None:
                mine.append(home := [[], set()])
            home[0].append(s)
            home[1] |= t
        convs += [c for c, _ in mine]
    return convs


def micro_batches(lengths, batch_size, seed, pool):
    """Endless stream of micro-batches (lists of sample indices) with little padding: shuffle,
    cut into pools of `pool` micro-batches, sort each pool by length, cut it into micro-batches
    of similar lengths, shuffle their order. Every rank draws the same stream from the seed.
    Length bucketing rather than packing: packing several conversations into one row would
    need per-conversation attention masks and M-RoPE restarts, which only FlashAttention's
    varlen path gives; sorted pools of 64 micro-batches already keep padding near 1%."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(lengths), generator=g).tolist()
        batches = []
        for i in range(0, len(perm), pool * batch_size):
            chunk = sorted(perm[i:i + pool * batch_size], key=lambda j: lengths[j])
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]
        epoch += 1


def collate(samples, images, processor, left_pad=False, visual=None):
    """Samples -> model inputs and labels. labels = ids on the assistant's tokens, -100 on the
    prompt (system, user, image) and on padding. mm_token_type_ids marks the visual tokens:
    transformers needs it to give them M-RoPE's 2D (height, width) positions. visual: the frozen
    tower's tokens of every image (visual_tokens), passed instead of the pixels."""
    tok = processor.tokenizer
    L = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), L), tok.pad_token_id)
    labels = torch.full((len(samples), L), -100)
    att = torch.zeros((len(samples), L), dtype=torch.long)
    for k, s in enumerate(samples):
        n = len(s["ids"])
        sl = slice(L - n, L) if left_pad else slice(0, n)
        ids[k, sl] = torch.tensor(s["ids"])
        att[k, sl] = 1
        labels[k, sl] = torch.where(torch.tensor(s["lab"], dtype=torch.bool), ids[k, sl], -100)
    batch = dict(input_ids=ids, attention_mask=att, mm_token_type_ids=(ids == processor.image_token_id).long())
    if visual is not None:
        # transformers' documented way in: mm_encoder_outputs = what get_image_features returns
        idx = [s["img"] for s in samples]
        out = dict(pooler_output=(visual["tokens"][idx].flatten(0, 1),))
        if visual["deep"]:      # Qwen3-VL's DeepStack: early ViT blocks feed the first LLM layers too
            out["deepstack_features"] = [(d[idx].flatten(0, 1),) for d in visual["deep"]]
        batch.update(image_grid_thw=visual["grid"].expand(len(samples), 3), mm_encoder_outputs={"image": visual["cls"](**out)})
        return batch, labels
    # the real Qwen image processor: resize, CLIP mean/std, patchify into (patches, 3*2*p*p) rows
    vis = processor.image_processor(images=[images[s["img"]] for s in samples], return_tensors="pt")
    batch.update(pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"])
    return batch, labels


@torch.no_grad()
def visual_tokens(model, processor, images, device, batch=64):
    """What the frozen vision tower (merger included) says about every training image, computed
    once: with nothing in it training, its output is a fixed function of the image, and running
    it again for every sample of a single-turn batch of 16 took a step from 63 to 87 ms on CPU."""
    vis, tokens, deep = vision_tower(model), [], []
    for i in range(0, len(images), batch):
        px = processor.image_processor(images=list(images[i:i + batch]), return_tensors="pt").to(device)
        out = vis(px["pixel_values"].to(vis.dtype), grid_thw=px["image_grid_thw"])
        n = len(px["image_grid_thw"])
        tokens.append(out.pooler_output.view(n, -1, out.pooler_output.shape[-1]))
        deep.append([d.view(n, -1, d.shape[-1]) for d in getattr(out, "deepstack_features", None) or []])
    return dict(tokens=torch.cat(tokens), deep=[torch.cat(d) for d in zip(*deep)], cls=type(out), grid=px["image_grid_thw"][:1])


def load_world(split, n, tok, cfg, tasks, keep_masks=False):
    """The first n scenes of a split of cfg["data"] (data.open_dataset: the shapes world by default)
    -> (images (n, S, S, 3) uint8 at the VLM's input size, samples with their image index, scenes
    as (seed, scene), codes). The masks are only kept for the test split (the evaluation decodes
    against them at each image's own size) or when asked (vision pretraining)."""
    from itertools import islice
    from data import open_dataset
    from tokenizer import resize_image
    skipped = Counter()
    scenes = [(scene_seed(s["id"]), s) for s in islice(open_dataset(cfg.get("data", "shapes"), skipped, split=split), n)]
    if not scenes:
        raise UserError(f"--data={cfg.get('data', 'shapes')}: no usable scene in the {split} split")
    codes = scene_codes(tok, cfg, split, scenes)
    samples = []
    for k, ((seed, s), c) in enumerate(zip(scenes, codes)):
        if split == "train" and cfg.get("extra_none", 0) and "refs" in s:
            s = dict(s, refs=s["refs"] + absent_refs(seed, s, cfg["extra_none"]))
        samples += [dict(x, img=k) for x in scene_samples(seed, s, c.long().numpy(), tasks)]
    # every image is shown to the VLM at image_size^2 (the processor would resize it anyway)
    images = np.stack([resize_image(s["image"], cfg["image_size"]) for _, s in scenes])
    if split == "train" and not keep_masks:
        scenes = [(seed, {k: v for k, v in s.items() if k != "masks"}) for seed, s in scenes]
    return images, samples, scenes, codes


def scene_seed(scene_id):
    """A scene's integer seed (prompt paraphrases are drawn from it): the shapes world's own seed,
    or a stable hash of a file name."""
    return scene_id if isinstance(scene_id, int) else zlib.crc32(str(scene_id).encode())

# ----------------------------------------------------------------------------- training


def token_loss(model, batch, labels, word_ids):
    """Summed next-token cross-entropy over the labelled (assistant) tokens: position t predicts
    token t+1. Summed, not averaged, so micro-batches and ranks can be weighted by tokens. Also
    counts the teacher-forced argmax hits on the code words <|mt_0000|>..<|mt_0511|>: the key
    learnable quantity of this stage, the VLM reading the tokenizer's codes off image + phrase."""
    target = labels[:, 1:]                                     # (B, L-1), -100 = no loss
    keep = F.pad(target != -100, (0, 1))                       # (B, L): positions whose next token is labelled
    # The LM head runs on those positions only (transformers' logits_to_keep takes a boolean
    # mask): the prompt's logits are never used, and the whole (B, L, V) in fp32 would be ~12 GB
    # at 7B. On the CPU default it takes a step from 63 to 58 ms.
    logits = model(**batch, use_cache=False, logits_to_keep=keep).logits.float()   # (kept, V)
    target = target[keep[:, :-1]]
    loss = F.cross_entropy(logits, target, reduction="sum")
    with torch.no_grad():
        is_word = torch.isin(target, word_ids)
        hits = (logits.argmax(-1) == target)[is_word].sum()
    return loss, torch.stack([hits, is_word.sum()]).float()


STAGE_CONFIG = "stage_config.json"   # beside the weights: the config of the stage that wrote them


def stage_config(folder):
    """The config sft.py or grpo.py saved beside a model ({} if there is none: a released model)."""
    p = os.path.join(folder, STAGE_CONFIG)
    if not os.path.isfile(p):
        return {}
    try:
        with open(p) as f:
            stage = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is unreadable ({e}): the checkpoint is damaged")
    if not isinstance(stage, dict):
        raise UserError(f"{p} is not a stage config: the checkpoint is damaged")
    return stage


def save_checkpoint(model, opt, processor, cfg, step, path, master):
    """save_pretrained (model + processor) + optimizer state, into path.tmp, then swapped in:
    a crash mid-save leaves the previous checkpoint whole (or path.old, which --resume finds)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    # full, unsharded tensors gathered on rank 0 (a collective under FSDP: every rank calls it)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, state_dict=msd)
        processor.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": osd, "config": cfg}, os.path.join(tmp, "train_state.pt"))
        write_json(os.path.join(tmp, STAGE_CONFIG), cfg)
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def resume_dir(model_dir):
    """The checkpoint to resume from: model_dir, or model_dir.old, which exists alone only after a
    crash between the two renames of a save. Returns (folder, its train_state.pt)."""
    src = model_dir if os.path.exists(model_dir) else model_dir + ".old"
    if not os.path.exists(os.path.join(src, "train_state.pt")):
        raise UserError(f"--resume: no checkpoint in {model_dir}")
    return src, torch.load(os.path.join(src, "train_state.pt"), map_location="cpu", weights_only=False)


def setup(cfg, tok, tasks, model_dir):
    """Everything training starts from, in a fixed order after the seed (bench.py calls it too, so
    its peer trains the very same weights on the very same conversations): the train split's
    samples with their mask words, the VLM and its processor (resumed from model_dir, a released
    base model, or built from the config), the vocabulary surgery, and the tokenized
    conversations. Returns model, processor, images, conversations, the 512 code words' ids,
    the resumed train state (or None), how many conversations max_len dropped, the scene count."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if not rank0:
        dist.barrier()          # rank 0 encodes the masks and caches the codes, then the others read them
    built = not cfg["resume"] and not cfg["base_model"]
    images, samples, scenes, codes = load_world("train", cfg["n_train"], tok, cfg, tasks,
                                                keep_masks=built and cfg["vision_pretrain_steps"] > 0)
    if rank0 and dist.is_initialized():
        dist.barrier()
    state = None
    if cfg["resume"]:
        src, state = resume_dir(model_dir)
        model, processor = load_pretrained(src, cfg)
    elif cfg["base_model"]:
        model, processor = load_pretrained(cfg["base_model"], cfg)
    else:
        processor = build_processor(cfg, text_corpus([s for _, s in scenes[:500]]))
        model = build_model(cfg, processor)
    word_ids = torch.tensor(add_mask_tokens(model, processor)[1:-1])       # the 512 code words
    if built:
        # every rank runs the same seeded steps on the same data: identical weights, no broadcast
        codebook = tok.rvq.codebook.detach().cpu().float()
        if cfg["word_init"] == "codebook":
            init_words_from_codebook(model, word_ids, codebook)
        if cfg["vision_pretrain_steps"]:
            pretrain_vision(model, processor, images, scenes, codes, codebook, cfg, log=print if rank0 else lambda *a: None)
        scenes = None
    convs, dropped = tokenize(conversations(samples, cfg["turns"], cfg["seed"]), images, processor, cfg["max_len"])
    return model, processor, images, convs, word_ids, state, dropped, len(images)


def parallelize(model, cfg, world, device):
    """One process: the model itself. Several: FSDP2 with --fsdp (each decoder layer and vision
    block its own unit, so only one layer's full weights exist at a time: all-gathered before its
    forward, freed after; the root unit holds the rest - embeddings, merger, LM head; bf16
    compute, fp32 gradient reduction on GPU), else DDP (every rank holds the whole model;
    gradients are averaged in buckets during backward). grpo.py wraps its policy the same way."""
    if cfg["fsdp"] and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
            else MixedPrecisionPolicy()
        for block in list(vision_tower(model).blocks) + list(decoder_layers(model)):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        return fully_shard(model, mesh=mesh, mp_policy=mp)
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def main():
    try:
        cfg = dict(configure(DEFAULTS, PRESETS), stage="sft")
        tasks = cfg["tasks"].split(",")
        if not set(tasks) <= {"refer", "caption", "gcg"} or not tasks:
            raise UserError(f"--tasks takes a comma list of refer, caption, gcg; got {cfg['tasks']!r}")
        if cfg["word_init"] not in ("mean", "codebook"):
            raise UserError(f"--word_init takes mean or codebook, got {cfg['word_init']!r}")
    except UserError as e:
        die(e)
    rank, world, device = init_distributed(cfg["device"])
    master = rank == 0
    cuda = device.type == "cuda"
    t_start = time.time()
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank (FSDP does not broadcast)
    if master:
        print("config:", cfg)
    out = cfg["out_dir"]
    model_dir = os.path.join(out, "model")

    # ---- Stage 1: the mask tokenizer turns every target mask into its two words
    try:
        tok = load_tokenizer(cfg["tokenizer_ckpt"])
    except UserError as e:
        die(f"{e} (or pass --tokenizer_ckpt=PATH)")
    # ---- the conversations with their mask words, the VLM and its vocabulary surgery
    try:
        model, processor, images, samples, word_ids, state, dropped, n_scenes = setup(cfg, tok, tasks, model_dir)
    except UserError as e:
        die(e)
    step = state["step"] if state else 0
    word_ids = word_ids.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        count = {t: sum(x["task"] == t for s in samples for x in s["turns"]) for t in tasks}
        print(f"model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, vocabulary {len(processor.tokenizer)}"
              f" | data: {n_scenes} train scenes -> {len(samples)} conversations of {count}, "
              f"{dropped} dropped as longer than max_len={cfg['max_len']}")
        if step:
            print(f"resuming from step {step}")
    if not samples:
        die("no training samples left (is max_len too small?)")

    # ---- what trains: the paper freezes the vision tower and trains the projector + LLM
    cfg["tower_frozen"] = not cfg["base_model"] and cfg["vision_pretrain_steps"] > 0
    set_trainable(model, cfg)
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(device)
    # a frozen tower (merger included) is run once over the training images, not every step
    visual = None if any(p.requires_grad for p in vision_tower(model).parameters()) else \
        visual_tokens(model, processor, images, device)
    net = parallelize(model, cfg, world, device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = adamw(params, cfg)
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    # bf16 autocast on GPU (paper: bf16); fp32 on CPU, where bf16 matmuls are slow
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    # ---- the loop: every rank walks the same stream of micro-batches and takes its share
    # (micro-batch j of a step goes to rank j % world), so a step's global batch is the same
    # set of conversations on 1 process with grad_accum=A*N as on N processes with A each
    A, steps = cfg["grad_accum"], cfg["steps"]
    stream = micro_batches([len(s["ids"]) for s in samples], cfg["batch_size"], cfg["seed"], cfg["bucket_pool"])
    for _ in range(step * A * world):          # resume: skip what was already trained on
        next(stream)
    pad_tokens = all_tokens = 0
    t0, run_steps, tokens_window, loss_window, word_window = time.time(), 0, 0, [], torch.zeros(2)
    net.train()
    while step < steps:
        lr = lr_at(step, steps, cfg["lr"], cfg["warmup_frac"], cfg["min_lr_ratio"])
        for gr in opt.param_groups:
            gr["lr"] = lr
        group = [next(stream) for _ in range(A * world)]
        # The loss of a step is the mean over every assistant token of the GLOBAL batch; each
        # rank knows the whole group, so it can count them without communication. DDP / FSDP
        # average gradients over ranks, hence the factor world below.
        n_tok = sum(sum(samples[j]["lab"]) for mb in group for j in mb)
        loss_sum, words = torch.zeros((), device=device), torch.zeros(2, device=device)
        mine = group[rank::world]
        for micro, mb in enumerate(mine):
            batch, labels = collate([samples[j] for j in mb], images, processor, visual=visual)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            pad_tokens += int((batch["attention_mask"] == 0).sum())
            all_tokens += batch["attention_mask"].numel()
            tokens_window += int(batch["attention_mask"].sum())
            # DDP all-reduces gradients on the last micro-batch only. FSDP2 reduce-scatters every
            # micro-batch: skipping it would keep full unsharded fp32 gradient sums on every rank
            # (31 GB at 7B), more than the communication it saves is worth.
            if isinstance(net, torch.nn.parallel.DistributedDataParallel):
                net.require_backward_grad_sync = micro == len(mine) - 1
            with amp:
                loss, hits = token_loss(net, batch, labels.to(device), word_ids)
            (loss * world / n_tok).backward()
            loss_sum += loss.detach()
            words += hits
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])   # FSDP: over the sharded grads, globally
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_steps += 1
        if world > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(words)
        loss_window.append(loss_sum.item() / n_tok)
        word_window += words.cpu()
        if master and (step % cfg["log_every"] == 0 or step == steps or step == 1):
            dt = (time.time() - t0) / run_steps
            tok_s = tokens_window * world / (time.time() - t0)
            # MFU: ~6 FLOPs per parameter per token (forward + backward) against the GPUs' peak
            mfu = f" | MFU {6 * n_params * tok_s / (world * cfg['peak_tflops'] * 1e12):.1%}" if cuda else ""
            print(f"step {step:5d}/{steps} | loss {np.mean(loss_window):.4f} "
                  f"| mask-word acc {word_window[0] / word_window[1].clamp(min=1):.3f} | lr {lr:.2e} "
                  f"| {dt * 1000:.0f} ms/step | {tok_s:.0f} tok/s{mfu}")
            loss_window, word_window = [], torch.zeros(2)
        if step % cfg["ckpt_every"] == 0 or step == steps:
            save_checkpoint(net, opt, processor, cfg, step, model_dir, master)
        if stop_early(cfg, run_steps, step, steps, master):
            return
    train_seconds = time.time() - t_start
    counts = torch.tensor([pad_tokens, all_tokens], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
        dist.destroy_process_group()
    padding_fraction = float(counts[0] / counts[1].clamp(min=1))

    # ---- evaluation, on rank 0, of the model as saved (it checks the saved format too): a
    # fresh AutoModelForImageTextToText, as grpo.py or any user would load it
    if not master or not cfg["eval_n"]:
        if master:
            print(f"done in {train_seconds:.0f} s; padding {padding_fraction:.1%}")
        return
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    with amp:
        metrics = evaluate(model, processor, tok, cfg, n=cfg["eval_n"], gallery=os.path.join(out, "gallery.png"))
    metrics.update(refer_miou_over_ceiling=metrics["refer_miou"] / max(metrics["tokenizer_ceiling_miou"], 1e-9),
                   padding_fraction=padding_fraction, train_seconds=train_seconds, dropped_too_long=dropped,
                   steps=steps, n_params=n_params, preset=cfg["preset"])
    write_json(os.path.join(out, "metrics.json"), metrics)
    print(f"test: referring mIoU {metrics['refer_miou']:.4f} (tokenizer ceiling {metrics['tokenizer_ceiling_miou']:.4f}, "
          f"ratio {metrics['refer_miou_over_ceiling']:.2f}) | cIoU {metrics['refer_ciou']:.4f} "
          f"| N-acc {metrics['nacc']:.3f} | exact mask words {metrics['exact_match']:.3f} "
          f"| caption attributes {metrics['caption_attr_acc']:.3f}")
    print(f"padding {padding_fraction:.1%} | trained in {train_seconds:.0f} s | wrote {model_dir}, {out}/metrics.json, "
          f"{out}/gallery.png")

# ----------------------------------------------------------------------------- evaluation
ATTRS = {"color": ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"),
         "shape": ("circle", "square", "triangle", "star", "ellipse", "ring"),
         "size": ("small", "medium", "big")}


@torch.no_grad()
def generate(model, processor, samples, images, max_new_tokens, batch):
    """Greedy decoding, batched with left padding (sorted by length to pad little); returns the
    generated text of each sample, special tokens kept (they carry the grounding), cut at <|im_end|>."""
    tok = processor.tokenizer
    out = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["ids"]))
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        prompts = [dict(samples[j], ids=samples[j]["ids"][:samples[j]["n_prompt"]], lab=[False] * samples[j]["n_prompt"])
                   for j in idx]
        inputs, _ = collate(prompts, images, processor, left_pad=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        for j, row in zip(idx, gen[:, inputs["input_ids"].shape[1]:]):
            out[j] = tok.decode(row, skip_special_tokens=False).split("<|im_end|>")[0].split("<|endoftext|>")[0]
    return out


@torch.no_grad()
def evaluate(model, processor, tok, cfg, n=100, gallery=None):
    """Greedy generation on the first n test scenes, scored through the tokenizer's decoder.
    Reads cfg keys tokenizer_ckpt, out_dir (codes cache), eval_batch. Returns:
    refer_miou / refer_ciou: GRES-style, prediction = union of the decoded masks vs the union of
      the targets, empty target & empty prediction -> IoU 1; cIoU = sum I / sum U (all referring
      prompts: single, multi and no-target; per kind as refer_miou_<kind>);
    nacc: no-target prompts answered with no mask; exact_match: generated codes == the tokenizer's
      codes of the targets (prompts with targets); caption_attr_acc: colour, shape and size words
      of the object right in the generated region caption (mean over the three);
    tokenizer_ceiling_miou: the same mIoU with decode(encode(targets)): what perfect words give."""
    from PIL import Image, ImageDraw
    was_training = model.training
    model.eval()
    images, samples, scenes, codes = load_world("test", n, tok, cfg, ("refer", "caption"))
    samples, _ = tokenize([[s] for s in samples], images, processor, max_len=10 ** 9)   # one turn each
    samples = [dict(c["turns"][0], **c) for c in samples]
    refer = [s for s in samples if s["task"] == "refer"]
    caps = [s for s in samples if s["task"] == "caption"]
    t0 = time.time()
    # a mask is 4 tokens; scenes hold at most 6 objects -> at most 24 words + <|im_end|>
    refer_text = generate(model, processor, refer, images, 4 * 6 + 2, cfg["eval_batch"])
    # a caption is ~10 words: "a small red circle at the top left."
    cap_text = generate(model, processor, caps, images, 24, cfg["eval_batch"])
    gen_seconds = time.time() - t0

    # Masks are text: parse the generated words (tolerantly: PAPER.md section 2's repairs), then
    # decode them with the Stage-1 decoder over the same image. Per scene one decode call for every
    # predicted mask of every prompt, and one for decode(encode(GT)) = the tokenizer's ceiling.
    pred_codes = [[c for c in text_to_codes(t) if c != (-1, -1)] for t in refer_text]
    by_scene = {}
    for k, s in enumerate(refer):
        by_scene.setdefault(s["img"], []).append(k)
    S = images.shape[1]
    pred_masks, ious, inter, union, rows = [None] * len(refer), np.zeros(len(refer)), 0, 0, []
    ceiling = np.zeros(len(refer))
    for img, ks in by_scene.items():
        image, gt_masks = scenes[img][1]["image"], scenes[img][1]["masks"]
        flat = [c for k in ks for c in pred_codes[k]]
        dec = tok.decode(image, np.array(flat).reshape(-1, 2)) if flat else np.zeros((0, S, S), bool)
        rebuilt = tok.decode(image, codes[img].long().numpy())   # decode(encode(GT)), per object
        pos = 0
        for k in ks:
            t = refer[k]["targets"]
            gt = gt_masks[t].any(0) if t else np.zeros((S, S), bool)
            pred = dec[pos:pos + len(pred_codes[k])].any(0) if pred_codes[k] else np.zeros((S, S), bool)
            pos += len(pred_codes[k])
            ious[k] = iou(pred[None], gt[None])[0]           # empty GT & empty prediction -> 1
            ceiling[k] = iou((rebuilt[t].any(0) if t else np.zeros((S, S), bool))[None], gt[None])[0]
            inter, union = inter + (pred & gt).sum(), union + (pred | gt).sum()
            pred_masks[k] = pred
    kinds = np.array([s["kind"] for s in refer])
    none = kinds == "none"    # N-acc: a no-target prompt is right when no mask at all comes back
    # The key learnable quantity: did the VLM say exactly the tokenizer's words for the targets?
    # (A near miss can still decode to a good mask: neighbouring codes of the same colour often
    # paint the same object, which is why mIoU can run ahead of this number.)
    exact = [pred_codes[k] == text_to_codes(s["answer"]) for k, s in enumerate(refer) if s["targets"]]
    # region captions: which colour / shape / size word the caption uses, against the object's
    attr_hits = []
    for s, text in zip(caps, cap_text):
        words = text.lower().replace(".", " ").split()
        for key, vocab in ATTRS.items():
            said = [w for w in words if w in vocab]
            attr_hits.append(said[:1] == [s["obj"][key]])
    metrics = dict(
        refer_miou=float(ious.mean()), refer_ciou=float(inter / max(union, 1)),
        **{f"refer_miou_{k}": float(ious[kinds == k].mean()) for k in ("single", "multi", "none") if (kinds == k).any()},
        nacc=float(np.mean([not pred_codes[k] for k in np.flatnonzero(none)])) if none.any() else None,
        exact_match=float(np.mean(exact)) if exact else None,
        caption_attr_acc=float(np.mean(attr_hits)) if attr_hits else None,
        tokenizer_ceiling_miou=float(ceiling.mean()),
        eval_scenes=n, eval_refer=len(refer), eval_captions=len(caps), eval_generate_seconds=gen_seconds)
    if gallery:
        # rows: image | ground truth | prediction, phrase and generated words underneath
        for k in [k for k in range(len(refer)) if refer[k]["targets"]][:8]:
            s = refer[k]
            image = images[s["img"]]
            gt = scenes[s["img"]][1]["masks"][s["targets"]]
            row = np.concatenate([image, overlay(image, gt), overlay(image, pred_masks[k][None])], 1)
            row = np.asarray(Image.fromarray(row).resize((row.shape[1] * 2, row.shape[0] * 2), Image.NEAREST))
            strip = Image.new("RGB", (row.shape[1], 28), "white")
            draw = ImageDraw.Draw(strip)
            draw.text((4, 2), f"{s['phrase']}  (IoU {ious[k]:.2f})", fill="black")
            draw.text((4, 15), refer_text[k][:110], fill="gray")
            rows.append(np.concatenate([np.asarray(strip), row], 0))
        if rows:
            os.makedirs(os.path.dirname(gallery) or ".", exist_ok=True)
            Image.fromarray(np.concatenate(rows, 0)).save(gallery)
    model.train(was_training)
    return metrics


if __name__ == "__main__":
    main()
