"""
The config-built tiny Qwen-VL of the embedded default: what a released Qwen-VL brings, made here.

The paper fine-tunes a released Qwen2.5-VL / Qwen3-VL. Nothing can be downloaded in the default
run, so sft.py builds a small one from the transformers config classes, with the same modules
(ViT with 2D RoPE, the 2 x 2 patch merger that is the projector, the M-RoPE decoder), only
narrower and shallower, and stands in for what pretraining gives a released model:
- build_processor: a byte-level BPE with Qwen's own normalizer and pre-tokenizer, learned on the
  world's text, inside the real Qwen2Tokenizer and Qwen-VL processor classes, so everything it
  saves loads with AutoProcessor / AutoModelForImageTextToText like a released model;
- build_model: the model from its config (Qwen3-VL by default, whose ViT adds a learned position
  table and DeepStack; --model_type=qwen2_5_vl);
- pretrain_vision: a short dense pretraining of the random vision tower (every released ViT is
  pretrained; a random one collapses under the LM's gradient);
- init_words_from_codebook: the 512 code words' rows start from the tokenizer's codebooks.
None of this runs with --base_model (a released model has all of it).
"""

import contextlib
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, lr_at, set_lr
from vlm import vision_tower

# ----------------------------------------------------------------------------- processor and model
# Qwen's special tokens, in Qwen's order; the config-built tokenizer has exactly these.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
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
    """A small Qwen3-VL (or Qwen2.5-VL) from its config classes: the same modules as the
    released models (ViT with 2D RoPE, 2x2 patch merger = the projector, M-RoPE decoder),
    only narrower and shallower. The embedding matrix is padded past the tokenizer, as in Qwen."""
    tid = processor.tokenizer.convert_tokens_to_ids
    H, heads = cfg["hidden_size"], cfg["n_heads"]
    # M-RoPE splits each head's rotary frequencies over (time, height, width); Qwen2.5-VL-7B
    # uses [16, 24, 24] of 64, we keep the proportions. rope_theta 1e4 instead of Qwen's 1e6:
    # conversations here are a few hundred tokens, not 32k.
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


# ----------------------------------------------------------------------------- vision pretraining
@contextlib.contextmanager
def patch_embed_as_matmul(vis):
    """Inside the block, the ViT's patch embedding runs as the matmul it is. Qwen-VL's patch
    embedding is a Conv3d whose kernel is its stride, over pixel_values that the processor has
    already cut into patches, flattened in the weight's own (channel, time, row, column) order: on
    each patch it is exactly patch @ W.flatten(1).T + b. The numbers are the same; on a CPU the
    conv's backward is slower than the rest of the tiny tower together (docs/LOG.md)."""
    pe = vis.patch_embed
    W, b = pe.proj.weight, pe.proj.bias
    pe.forward = lambda x: F.linear(x.reshape(-1, W[0].numel()).to(W.dtype), W.flatten(1), b)
    try:
        yield
    finally:
        del pe.forward                      # the module's own forward again


def pretrain_vision(model, processor, images, scenes, codes, codebook, cfg, log=print):
    """A stand-in for the pretraining every released ViT has, for the config-built model only.
    Without it the random tower's visual tokens collapse to one large constant vector within a few
    hundred SFT steps (an attention sink) and the model answers the same whatever the image. Here
    the tower learns, in a few minutes, to say for each visual token (a cell of 2 x 2 patches after
    the merger, 16 x 16 px by default) what lies in each 4 x 4 px sub-cell (colour and shape class,
    or just object / background outside the shapes world), and to regress the Stage-1 latent
    e1 + e2 of the object covering most of the token: the geometry the mask words encode. A linear
    head reads the merger's output; it is thrown away after (how long it takes to be useful:
    docs/LOG.md)."""
    vis = vision_tower(model)
    ip = processor.image_processor
    S, m, cell = images.shape[1], ip.patch_size * ip.merge_size, 4
    g, k = S // m, m // cell
    attrs = all("color" in o and "shape" in o for _, sc in scenes for o in sc["objects"])
    from data.shapes import COLORS, SHAPES
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
        labels = torch.stack([col * fg, shp * fg], -1)                                  # (S/4, S/4, 2)
        cells.append(labels.view(g, k, g, k, 2).permute(0, 2, 1, 3, 4).reshape(g * g, k * k, 2))
        tok_cov = ms.view(len(ms), g, m, g, m).mean((2, 4)).flatten(1)              # (N, g*g)
        z = codebook[0][c[:, 0].long()] + codebook[1][c[:, 1].long()]
        best = tok_cov.max(0)
        latents.append(z[best.indices]), has.append(best.values > 0.15)
    cells, latents, has = torch.cat(cells), torch.cat(latents), torch.cat(has)
    latents = latents / latents.pow(2).mean().sqrt()
    head = torch.nn.Linear(model.config.vision_config.out_hidden_size, k * k * (n_col + n_shp) + latents.shape[1])
    params = list(vis.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["vision_pretrain_lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps, t0 = cfg["vision_pretrain_steps"], time.time()
    with patch_embed_as_matmul(vis):
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
            set_lr(opt, lr_at(step, steps, cfg["vision_pretrain_lr"], 0.05, 0.1))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % 100 == 0 or step + 1 == steps:
                log(f"vision pretraining {step + 1}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f} s")
