"""
What every stage does with a Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), in one place.

sft.py trains it, grpo.py reinforces it, infer.py and the evaluation ask it; all of them go
through the same few functions, so a sample is tokenized, batched and generated the same way
everywhere:
- the chat template's parts, tokenize (conversations -> ids + which tokens carry the loss),
  collate (-> model inputs), micro_batches (length-bucketed), visual_tokens (a frozen tower once);
- load / freeze / parallelize / save / resume a model (save_pretrained folders with the stage's
  config beside the weights);
- the Stage-2/3 data: every scene's samples (data/tasks.py) with the target words the Stage-1
  tokenizer says for its masks, encoded once and cached on disk;
- rollout: G sampled completions a prompt on one shared prefill (what GRPO learns from);
- generate and evaluate: greedy answers, decoded through the Stage-1 decoder, scored as the
  paper scores them (GRES mIoU / cIoU, N-acc) plus exact words and caption attributes.
"""

import hashlib
import itertools
import math
import os
import shutil
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (UserError, atomic_save, autocast, gather, iou, is_master, overlay, print0, progress, read_checkpoint,
                    read_json, resize_image, write_json)
from data.tasks import ATTRS, absent_refs, conversations, scene_samples, scene_seed
from samtok import MASK_END, MASK_START, mask_tokens, released_files, text_to_codes

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")   # a reply ends at Qwen's end of turn (or end of text)


def vision_tower(model):
    return model.model.visual


def decoder_layers(model):
    return model.model.language_model.layers


def cut_at_end(text):
    """A reply's text up to its end-of-turn token."""
    return text.split(END_OF_TURN[0])[0].split(END_OF_TURN[1])[0]

# ----------------------------------------------------------------------------- chat, tokens, batches
def chat_parts(processor):
    """The chat template's text around the user's and the assistant's words, found by rendering
    a two-turn conversation with marker strings once (instead of the template per sample):
    first = up to the first user text (with one image placeholder: image_tokens expands it),
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
    return first, ask, nxt[len(eos):]


def image_tokens(processor, image):
    """How many visual tokens the processor gives an image: its patch grid (after the resize to a
    multiple of the patch size, within min/max pixels) over the merger's 2 x 2. A function of the
    image's height and width only: the same for every image_size^2 image, one per size at native
    resolution."""
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


def tokenize(convs, images, processor, max_len):
    """Conversations (lists of turns about one image) -> token ids and which of them carry the
    loss: exactly the assistant's replies, each with its closing <|im_end|> (so the model learns
    to stop); system, user and image tokens do not. n_prompt = where the first reply starts (a
    one-turn conversation's prompt, for generation). A conversation over max_len is dropped and
    counted: cutting it would cut image tokens (the model then breaks) or a reply (half a mask)."""
    text_tok = processor.tokenizer
    first, ask, nxt = chat_parts(processor)
    count = {}          # image size -> its visual tokens (one count for all square training images)
    pieces = []
    for conv in convs:
        image = images[conv[0]["img"]]
        if image.shape not in count:
            count[image.shape] = image_tokens(processor, image)
        head = first.replace(processor.image_token, processor.image_token * count[image.shape])
        for k, turn in enumerate(conv):
            pieces += [(head if k == 0 else nxt) + turn["prompt"] + ask, turn["answer"] + text_tok.eos_token]
    ids = iter(text_tok(pieces, add_special_tokens=False)["input_ids"])
    kept, dropped = [], 0
    for conv in convs:
        seq, in_loss = [], []
        for _ in conv:
            p, a = next(ids), next(ids)
            seq += p + a
            in_loss += [False] * len(p) + [True] * len(a)
        if len(seq) > max_len:
            dropped += 1
            continue
        kept.append(dict(turns=conv, img=conv[0]["img"], ids=seq, in_loss=in_loss, n_prompt=in_loss.index(True)))
    return kept, dropped


def training_conversations(samples, images, processor, cfg, seed):
    """Training samples -> tokenized conversations, as sft.py trains on them in memory and
    ConversationBatches streams them: data.tasks.conversations with cfg's turns and the referring
    task's share (refer_repeat), then tokenize with its max_len. -> (conversations, dropped)."""
    return tokenize(conversations(samples, cfg["turns"], seed, {"refer": cfg["refer_repeat"]}), images, processor,
                    cfg["max_len"])


def micro_batches(lengths, batch_size, seed, pool, skip=0):
    """Endless stream of micro-batches (lists of sample indices) with little padding: shuffle,
    cut into pools of `pool` micro-batches, sort each pool by length, cut it into micro-batches
    of similar lengths, shuffle their order. Every rank draws the same stream from the seed.
    Length bucketing rather than packing: several conversations in one row would need a mask
    that keeps each to itself (a dense one grows with the square of the row, as in GRPO's
    shared_prefix_logps, where a step's answers are short) and M-RoPE restarts; sorted pools
    already keep padding under 1 % (docs/LOG.md). skip: micro-batches
    of the stream to pass over first, so a resumed run continues where it stopped."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(lengths), generator=g).tolist()
        batches = []
        for i in range(0, len(perm), pool * batch_size):
            chunk = sorted(perm[i:i + pool * batch_size], key=lambda j: lengths[j])
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            if skip:
                skip -= 1
                continue
            yield batches[b]
        epoch += 1


def collate(samples, images, processor, left_pad=False, visual=None):
    """Samples -> model inputs and labels. labels = ids on the assistant's tokens, -100 on the
    prompt (system, user, image) and on padding. mm_token_type_ids marks the visual tokens:
    transformers needs it to give them M-RoPE's 2D (height, width) positions. visual: the frozen
    tower's tokens of every image (visual_tokens), passed instead of the pixels."""
    L = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), L), processor.tokenizer.pad_token_id)
    labels = torch.full((len(samples), L), -100)
    att = torch.zeros((len(samples), L), dtype=torch.long)
    for k, s in enumerate(samples):
        n = len(s["ids"])
        sl = slice(L - n, L) if left_pad else slice(0, n)
        ids[k, sl] = torch.tensor(s["ids"])
        att[k, sl] = 1
        labels[k, sl] = torch.where(torch.tensor(s["in_loss"], dtype=torch.bool), ids[k, sl], -100)
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


@torch.no_grad()
def generate(model, processor, samples, images, max_new_tokens, batch):
    """Greedy decoding, batched with left padding (sorted by length to pad little); returns the
    generated text of each sample, special tokens kept (they carry the grounding), cut at <|im_end|>."""
    text_tok = processor.tokenizer
    out = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["ids"]))
    for i in progress(range(0, len(order), batch), "generating", total=-(-len(order) // batch)):
        idx = order[i:i + batch]
        prompts = [dict(samples[j], ids=samples[j]["ids"][:samples[j]["n_prompt"]],
                        in_loss=[False] * samples[j]["n_prompt"]) for j in idx]
        inputs, _ = collate(prompts, images, processor, left_pad=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=text_tok.pad_token_id, eos_token_id=text_tok.convert_tokens_to_ids(list(END_OF_TURN)))
        for j, row in zip(idx, gen[:, inputs["input_ids"].shape[1]:]):
            out[j] = cut_at_end(text_tok.decode(row, skip_special_tokens=False))
    return out


# ----------------------------------------------------------------------------- sampling groups (GRPO)
def banned_tokens(processor, rows, device):
    """(rows,) 0 / -inf: what the policy may not write. The vision placeholders (an <|image_pad|>
    in an answer would be taken for a slot of image features by the next forward) and the padding
    rows of the embedding matrix past the tokenizer (no text at all). Applied when sampling and
    when scoring, so the log-probs are those of the distribution the tokens were drawn from."""
    text_tok = processor.tokenizer
    bias = torch.zeros(rows, device=device)
    bias[len(text_tok):] = -math.inf
    bias[text_tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])] = -math.inf
    return bias


def lean_decoding(model):
    """Whether decode_step can stand in for the model's forward: plain (not FSDP-sharded) weights,
    sdpa or eager attention, every layer full attention, rope without a length-dependent scaling."""
    from torch.distributed.fsdp import FSDPModule
    lm = model.model.language_model
    return (not isinstance(model, FSDPModule) and model.config._attn_implementation in ("sdpa", "eager")
            and not getattr(lm.config, "use_sliding_window", False)
            and set(getattr(lm.config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and getattr(lm.rotary_emb, "rope_type", "default") == "default")


def decode_step(model, cache, new, positions, att):
    """One token of every row, the model's own modules wired by hand: the logits (rows, V) of the
    next token after new (rows,), at text positions (rows,), attending to the cache and itself
    under att (rows, S + 1), the cache grown in place. The same arithmetic as the model's forward
    (tested equal), without its per-call machinery (mask building, cache classes, output
    records, rope for three axes), which weighs in a small model's one-token step, where the
    matmuls are tiny. For a text token M-RoPE's three position axes (time, height, width) are
    equal, so its rotation is plain RoPE at that position."""
    lm, rows = model.model.language_model, len(new)
    rot = lm.rotary_emb
    freqs = positions[:, None].float() * rot.inv_freq.to(positions.device)[None]        # (rows, d / 2)
    emb = torch.cat([freqs, freqs], -1)[:, None, None]                                    # (rows, 1, 1, d)
    cos, sin = emb.cos() * rot.attention_scaling, emb.sin() * rot.attention_scaling
    rotate = lambda x: x * cos + torch.cat([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], -1) * sin
    mask = att.bool()[:, None, None]                                                      # (rows, 1, 1, S + 1)
    h = lm.embed_tokens(new[:, None])                                                     # (rows, 1, hidden)
    for layer, kv in zip(lm.layers, cache.layers):
        a, x = layer.self_attn, layer.input_layernorm(h)
        q, k, v = (proj(x).view(rows, 1, -1, a.head_dim) for proj in (a.q_proj, a.k_proj, a.v_proj))
        if hasattr(a, "q_norm"):                      # Qwen3-VL normalises each head's query and key
            q, k = a.q_norm(q), a.k_norm(k)
        q, k, v = rotate(q.transpose(1, 2)), rotate(k.transpose(1, 2)), v.transpose(1, 2)
        kv.keys = torch.cat([kv.keys, k.to(kv.keys.dtype)], -2)
        kv.values = torch.cat([kv.values, v.to(kv.values.dtype)], -2)
        o = F.scaled_dot_product_attention(q.to(kv.keys.dtype), kv.keys, kv.values, attn_mask=mask, scale=a.scaling,
                                           enable_gqa=True)
        h = h + a.o_proj(o.transpose(1, 2).reshape(rows, 1, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))[:, -1]


@torch.no_grad()
def rollout(model, processor, prompts, images, G, max_new_tokens, temperature, generator, sync=False, visual=None):
    """G sampled completions for each prompt (prompt 0's G first): dicts with ids (token ids, ending
    with the end-of-turn token unless cut at max_new_tokens: finished False) and logps (each
    token's log-prob under the sampling distribution, softmax(logits / temperature)). The prompt - image included - is
    encoded once: one prefill over the B prompts, then the KV cache is repeated G times (B*G rows)
    and the completions are sampled token by token on it (decode_step), a finished row leaving
    the batch. Positions are M-RoPE's: the prompt's come from the model's own get_rope_index (2D
    for the image, 1D for text), and each new token takes the next text position, as a forward
    over the whole sequence would give it.
    sync: under FSDP every rank must run the same number of forwards, so all ranks decode until
    every rank is done. visual: a frozen tower's tokens (visual_tokens), passed instead of pixels."""
    text_tok = processor.tokenizer
    eos = torch.tensor(text_tok.convert_tokens_to_ids(list(END_OF_TURN)), device=model.device)
    inputs, _ = collate(prompts, images, processor, left_pad=True, visual=visual)
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    out = model(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(G)                          # rows: prompt 0 x G, prompt 1 x G, ...
    N = len(prompts) * G
    att = inputs["attention_mask"].repeat_interleave(G, 0)
    nxt = (pos.amax(dim=(0, 2)) + 1).repeat_interleave(G)     # (N,) next text position
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    bias = banned_tokens(processor, logits.shape[-1], logits.device)
    done = torch.zeros(N, dtype=torch.bool, device=model.device)
    live = torch.arange(N, device=model.device)   # the rows still in the decoding batch, as indices of all N
    lean = lean_decoding(model)
    tokens = torch.full((N, max_new_tokens), text_tok.pad_token_id, device=model.device)
    logps = torch.zeros(N, max_new_tokens, device=model.device)
    for t in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float() / temperature + bias, -1)
        new = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
        new = torch.where(done[live], text_tok.pad_token_id, new)
        tokens[live, t], logps[live, t] = new, logprobs.gather(1, new[:, None]).squeeze(1)
        done[live] |= torch.isin(new, eos)
        left = (~done).sum()
        if sync:
            dist.all_reduce(left)
        if left == 0 or t == max_new_tokens - 1:
            break
        # Answers end at very different lengths ("No target." in 4 tokens, six masks in 25): a
        # finished row leaves the batch, its cache row with it, so a decode step computes the
        # rows still writing, not all N. Under sync a rank left with no row keeps one, whose
        # tokens are thrown away, to run the forwards the other ranks run.
        keep = (~done[live]).nonzero().squeeze(1)
        if len(keep) == 0:
            keep = keep.new_zeros(1)
        if len(keep) < len(live):
            cache.batch_select_indices(keep)
            live, att, nxt, new = live[keep], att[keep], nxt[keep], new[keep]
        att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
        if lean:
            logits = decode_step(model, cache, new, nxt + t, att)
        else:
            logits = model(input_ids=new[:, None], attention_mask=att, cache=cache, use_cache=True,
                           position_ids=(nxt + t).view(1, -1, 1).expand(3, -1, 1)).logits[:, -1]
    tokens, logps, ends = tokens[:, :t + 1].tolist(), logps[:, :t + 1].tolist(), set(eos.tolist())
    comps = []
    for row, lp in zip(tokens, logps):
        end = next((i for i, x in enumerate(row) if x in ends), None)
        n = end + 1 if end is not None else len(row)
        comps.append(dict(ids=row[:n], logps=lp[:n], finished=end is not None))
    return comps


def completion_text(processor, ids):
    """The answer text of a completion: decoded with special tokens kept (they carry the
    grounding), without the end-of-turn token."""
    return cut_at_end(processor.tokenizer.decode(ids, skip_special_tokens=False))


def completion_logps(model, batch, n_comp, temperature, bias):
    """log pi(o_t | q, o_<t) of every completion token: (N, n_comp), right-aligned like the batch.
    Only the last n_comp + 1 positions go through the LM head. The temperature divides the logits
    as in sampling, so the ratio compares the distributions the tokens came from."""
    logits = model(**batch, use_cache=False, logits_to_keep=n_comp + 1).logits[:, :-1].float() / temperature + bias
    ids = batch["input_ids"][:, -n_comp:]
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def shared_prefix_logps(net, prompt_inputs, row_of, comp_ids, comp_mask, temperature, bias):
    """log pi(o_t | q, o_<t) of every completion token, (N, L) left-aligned (token t in column t,
    comp_mask 1 on real tokens), with each PROMPT run once however many of its completions the
    batch holds, and no completion padded to the longest. The shared prefix, where it happens:
      1. the B distinct prompts (image included) run once, with gradients when grad is enabled,
         and leave their key/value cache and the logits of their last position (which predict
         each completion's first token);
      2. the B cached prompts are laid end to end as ONE sequence of B * P keys, and the N
         completions' real tokens end to end as one sequence of T = sum of lengths queries: a
         packed row, with a (T, B * P + T) mask that lets a token see its own prompt (its padding
         excepted) and the earlier tokens of its own completion, nothing else;
      3. that row runs on the laid-out cache, each token at its M-RoPE position, the next text
         position after its prompt's largest plus its index, as the unshared forward would number
         it. In backward every prompt key receives the SUM of its completions' gradients.
    Cost: a prompt of P tokens (~50 with a 16-token image in the tiny preset, ~1,000 at 448 px) and
    G completions of mean length l and longest L cost G * (P + L) token-forwards unshared, and
    P + G * l here: with P = 50, l = 6, L = 25, G = 8, 600 against 98; at the paper's scale, G = 16
    and L = 512, 16 * 1,512 against 1,000 + 16 * l; the backward shrinks the same way. Attention
    is exact: each token attends to the keys and values it would see in one forward over its own
    prompt + completion. (The mask is a custom 4D one: sdpa or eager attention, the default.)"""
    model = unwrap(net)
    pos, _ = model.model.get_rope_index(prompt_inputs["input_ids"], prompt_inputs["mm_token_type_ids"],
                                        image_grid_thw=prompt_inputs["image_grid_thw"],
                                        attention_mask=prompt_inputs["attention_mask"])
    # the prompt forward goes through the bare model: DDP must see one forward per backward (the
    # completions' below), and its gradient hooks still fire once for every parameter
    out = model(**prompt_inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    if cache is None or cache.get_seq_length() == 0:    # gradient checkpointing drops the cache in training
        raise RuntimeError("the prompt forward kept no key/value cache: the shared prefix needs use_cache")
    B, P = prompt_inputs["attention_mask"].shape
    for layer in cache.layers:                          # (B, heads, P, d) -> (1, heads, B * P, d)
        layer.keys, layer.values = (x.transpose(0, 1).reshape(1, x.shape[1], B * P, x.shape[-1])
                                    for x in (layer.keys, layer.values))
    # the packed row: real tokens only, row by row; for each, its row, its index, its prompt
    N, L = comp_ids.shape
    real = comp_mask.bool()
    row, t = real.nonzero(as_tuple=True)                                  # (T,) each, row-major
    ids = comp_ids[row, t][None]                                          # (1, T)
    positions = (pos.amax(dim=(0, 2))[row_of[row]] + 1 + t).view(1, 1, -1).expand(3, 1, -1)
    sees_prompt = (row_of[row][:, None] == torch.arange(B, device=ids.device).repeat_interleave(P)) \
        & prompt_inputs["attention_mask"].bool().flatten()                 # (T, B * P)
    sees_comp = (row[:, None] == row) & (t[:, None] >= t)                 # (T, T): own completion, causal
    mask = torch.cat([sees_prompt, sees_comp], 1)[None, None]             # (1, 1, T, B * P + T)
    # token 0 of a row is predicted by its prompt's last position, token t + 1 by its token t in
    # the packed row: only those positions reach the LM head (never an (N, L, V) tensor)
    r, t = real[:, 1:].nonzero(as_tuple=True)                            # token t + 1 of row r exists
    start = real.sum(1).cumsum(0) - real.sum(1)                           # each row's first index in the packed row
    packed = net(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                 logits_to_keep=start[r] + t).logits[0]                   # (T - N, V), in the order of (r, t)

    def score(lg, target):
        z = lg.float() / temperature + bias
        return z.gather(1, target[:, None]).squeeze(1) - z.logsumexp(-1)
    lp = torch.zeros(N, L, device=ids.device)
    lp[:, 0] = score(out.logits[:, -1][row_of], comp_ids[:, 0])
    lp[r, t + 1] = score(packed, comp_ids[r, t + 1])
    return lp


def completion_batch(rows, prompts, images, processor, share_prefix, device, visual=None):
    """A micro-batch of completions (rows: dicts with prompt, the index of its prompt, and ids) as
    model inputs, with mask (N, L) 1 on completion tokens. share_prefix: each distinct prompt once
    and the completions left-aligned beside it (shared_prefix_logps); else each row prompt +
    completion, left-padded so the completions are right-aligned (completion_logps). visual: a
    frozen tower's tokens (visual_tokens), passed instead of pixels."""
    to = lambda d: {k: v.to(device) if torch.is_tensor(v) else v for k, v in d.items()}
    L = max(len(r["ids"]) for r in rows)
    if share_prefix:
        uniq = list(dict.fromkeys(r["prompt"] for r in rows))
        inputs, _ = collate([prompts[j] for j in uniq], images, processor, left_pad=True, visual=visual)
        ids, mask = torch.full((len(rows), L), processor.tokenizer.pad_token_id), torch.zeros(len(rows), L)
        for k, r in enumerate(rows):
            ids[k, :len(r["ids"])], mask[k, :len(r["ids"])] = torch.tensor(r["ids"]), 1
        return dict(prompt=to(inputs), ids=ids.to(device), mask=mask.to(device),
                    row_of=torch.tensor([uniq.index(r["prompt"]) for r in rows], device=device))
    samples = [dict(img=prompts[r["prompt"]]["img"], ids=prompts[r["prompt"]]["ids"] + r["ids"],
                    in_loss=[False] * len(prompts[r["prompt"]]["ids"]) + [True] * len(r["ids"])) for r in rows]
    batch, labels = collate(samples, images, processor, left_pad=True, visual=visual)
    return dict(batch=to(batch), n=L, mask=(labels[:, -L:] != -100).float().to(device))


def batch_logps(model, b, temperature, bias):
    """The completion tokens' log-probs of a completion_batch, by whichever path built it."""
    if "prompt" in b:
        return shared_prefix_logps(model, b["prompt"], b["row_of"], b["ids"], b["mask"], temperature, bias)
    return completion_logps(model, b["batch"], b["n"], temperature, bias)


# ----------------------------------------------------------------------------- models and checkpoints
def load_pretrained(path, cfg, dtype=torch.float32):
    """A released (or previously saved) Qwen-VL and its processor, through the same Auto classes a
    user would call. The image processor is pinned to image_size^2 pixels: fixed-size images give
    a fixed number of visual tokens, which the training data pipeline relies on. image_size 0
    keeps the processor's own native resolution (aspect ratio kept, its min / max pixels)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001  a missing folder, a damaged weight file, a config of an unknown family
        raise UserError(f"cannot load a Qwen-VL model from {path!r}: {type(e).__name__}: {(str(e) or '?').splitlines()[0]}")
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    if not cfg["image_size"]:
        return model, processor
    if cfg["image_size"] % factor:
        raise UserError(f"--image_size={cfg['image_size']} must be a multiple of patch x merge = {factor} for {path}")
    ip.size = {"shortest_edge": cfg["image_size"] ** 2, "longest_edge": cfg["image_size"] ** 2}
    return model, processor


def tokenizer_of(cfg, folder, default):
    """--tokenizer_ckpt, or, when it was left at its default, the tokenizer a released model's
    folder carries (mask_tokenizer_*.pth, with the sam2.1_hiera_*.pt beside it). Written back into
    cfg, so the stage config saved beside the weights names the tokenizer that was used."""
    if cfg["tokenizer_ckpt"] == default and folder and (released := released_files(folder)):
        print0(f"tokenizer: {released[0]}, the one {folder} carries")
        cfg["tokenizer_ckpt"] = folder
    return cfg["tokenizer_ckpt"]


def resolve_init(path):
    """Stage 2's output folder or its model/ subfolder -> the model folder; one clear line for a
    missing or wrong-stage checkpoint."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "ckpt.pt")):
        f = path if os.path.isfile(path) else os.path.join(path, "ckpt.pt")
        try:
            ck = read_checkpoint(f)
            stage = ck.get("stage") if isinstance(ck, dict) else None
        except UserError:
            stage = None
        what = "the Stage-1 tokenizer checkpoint" if stage == "tokenizer" else "a file, not a model folder"
        raise UserError(f"--init_from={path} is {what}; it takes the Stage-2 folder that sft.py writes (out/sft)")
    if os.path.isdir(os.path.join(path, "model")):
        path = os.path.join(path, "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"no Stage-2 checkpoint at {path}: run `python sft.py` first (or pass --init_from=FOLDER)")
    return path


def load_model(path, cfg):
    """A saved Stage-2 (or Stage-3) model through the Auto classes, checked to speak in mask words."""
    model, processor = load_pretrained(path, cfg)
    text_tok = processor.tokenizer
    vocab = text_tok.get_vocab()
    if not all(w in vocab for w in mask_tokens()):
        raise UserError(f"{path} is not a Stage-2 checkpoint: its vocabulary has no mask words "
                        f"({MASK_START} ... {MASK_END}); run sft.py on it first")
    if "<|im_end|>" not in vocab:
        raise UserError(f"{path}: the tokenizer has no <|im_end|>, so a rollout could never end its turn")
    if max(text_tok.convert_tokens_to_ids(mask_tokens())) >= model.get_input_embeddings().weight.shape[0]:
        raise UserError(f"{path}: the embedding matrix is smaller than the vocabulary with mask words")
    return model, processor


def set_trainable(model, cfg):
    """What trains: the LLM, and of the vision tower what the config says. freeze_vision (the
    paper) freezes the tower but trains its merger, the projector. tower_frozen (set by sft.py
    for a config-built tower after pretrain_vision, and saved with the checkpoint, so grpo.py
    keeps it) freezes the whole tower, merger included: trained by the LM's gradient from the
    start, its visual tokens collapse to a constant (see pretrain_vision)."""
    for name, p in vision_tower(model).named_parameters():
        p.requires_grad = not cfg.get("tower_frozen") and (not cfg["freeze_vision"] or "merger" in name)


def parallelize(model, cfg, world, device, frozen=False):
    """One process: the model itself. Several: FSDP2 with --fsdp (each decoder layer and vision
    block its own unit, so only one layer's full weights exist at a time: all-gathered before its
    forward, freed after; the root unit holds the rest - embeddings, merger, LM head; bf16
    compute, fp32 gradient reduction on GPU), else DDP (every rank holds the whole model;
    gradients are averaged in buckets during backward). grpo.py wraps its policy the same way.
    frozen (GRPO's reference: no gradients, no optimizer): sharded the same way under --fsdp, its
    weights stored in bf16 on GPU (what its forward computes in anyway: 2 bytes a parameter,
    spread over the ranks, instead of 4 on each); without --fsdp the model itself (nothing to sync)."""
    if frozen and not (cfg["fsdp"] and world > 1):
        return model
    if cfg["fsdp"] and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (world,))
        if frozen and device.type == "cuda":
            model.to(torch.bfloat16)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
            else MixedPrecisionPolicy()
        for block in list(vision_tower(model).blocks) + list(decoder_layers(model)):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        return fully_shard(model, mesh=mesh, mp_policy=mp)
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


STAGE_CONFIG = "stage_config.json"   # beside the weights: the config of the stage that wrote them


def stage_config(folder):
    """The config sft.py or grpo.py saved beside a model ({} if there is none: a released model)."""
    p = os.path.join(folder, STAGE_CONFIG)
    if not os.path.isfile(p):
        return {}
    try:
        stage = read_json(p)
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is unreadable ({e}): the checkpoint is damaged")
    if not isinstance(stage, dict):
        raise UserError(f"{p} is not a stage config: the checkpoint is damaged")
    return stage


def save_checkpoint(model, opt, processor, cfg, step, path, stream=None):
    """save_pretrained (model + processor) + optimizer state (+ a data stream's position), into
    path.tmp, then swapped in: a crash mid-save leaves the previous checkpoint whole (or
    path.old, which --resume finds)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    # full, unsharded tensors gathered on rank 0 (a collective under FSDP: every rank calls it)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_master():
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrap(model).save_pretrained(tmp, state_dict=msd)
        processor.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": osd, "config": cfg, "stream": stream}, os.path.join(tmp, "train_state.pt"))
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
    crash between the two renames of a save. Returns (folder, its train_state.pt: step, optimizer
    state and config, plain tensors and containers, read with weights_only=True)."""
    src = model_dir if os.path.exists(model_dir) else model_dir + ".old"
    if not os.path.exists(os.path.join(src, "train_state.pt")):
        raise UserError(f"--resume: no checkpoint in {model_dir}")
    return src, read_checkpoint(os.path.join(src, "train_state.pt"))


# ----------------------------------------------------------------------------- the Stage-2/3 data
def file_hash(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def codes_table(mask_tok, cfg, split, n, shard=True, batch=16):
    """The codes pass: the tokenizer's codes of every mask of the first n items of a split of
    cfg["data"], as one table {keys (S,) sorted, start (S + 1,), codes (M, levels) int16}: scene
    `keys[i]` (data.stream's item key) has the masks' codes codes[start[i]:start[i + 1]] (codes_of).
    Cached on disk in codes/ beside out_dir (out/codes: sft.py and grpo.py share it), under a key
    made of the tokenizer checkpoint's content hash, the data spec, the split, n and the precision,
    so a new tokenizer never reuses stale words. Encoding is the heavy one-off work of Stages 2-3
    (SAM2's image encoder over every training image), so under torchrun it is sharded (shard=True,
    every rank calls this): rank r reads and encodes only its own items (data.stream.read_split)
    on its own device (bf16 autocast on GPU), and the codes - 4 bytes a mask - are all-gathered,
    so no rank waits for work it could share and nothing needs a shared filesystem. Whether the
    cache is there is agreed by all ranks first. At ~40 bytes a scene the table stays small."""
    from data.stream import read_split
    precision = "bf16" if mask_tok.device.type == "cuda" else "fp32"
    key = hashlib.sha1(f"{file_hash(mask_tok.checkpoint)}|{cfg['data']}|{split}|{n}|{precision}".encode())
    path = os.path.join(os.path.dirname(os.path.normpath(cfg["out_dir"])) or ".", "codes", f"{key.hexdigest()[:16]}.pt")
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard and dist.is_initialized() else (0, 1)
    cached = torch.tensor([os.path.exists(path)], dtype=torch.int32, device=mask_tok.device)
    if world > 1:
        dist.all_reduce(cached, op=dist.ReduceOp.MIN)        # every rank reads, or every rank encodes
    if cached.item():
        return read_checkpoint(path)
    t0, mine = time.time(), {}
    items = iter(progress(read_split(cfg["data"], split, rank, world, limit=n), f"encoding {split} masks"))
    with autocast(mask_tok.device):
        # batch images at a time through the encoders (mask_tok.encode_many: the same codes, faster)
        while chunk := list(itertools.islice(items, batch)):
            codes = mask_tok.encode_many([(s["image"], s["masks"]) for _, s in chunk])
            mine.update((k, c.cpu().short()) for (k, _), c in zip(chunk, codes))
    mine = {k: c for part in gather(mine, world) for k, c in part.items()}
    if not mine:
        raise UserError(f"--data={cfg['data']}: no usable scene in the {split} split")
    keys = sorted(mine)
    table = dict(keys=torch.tensor(keys), codes=torch.cat([mine[k] for k in keys]),
                 start=torch.tensor([0] + [len(mine[k]) for k in keys]).cumsum(0))
    if rank == 0:
        atomic_save(table, path)
        print(f"encoded the masks of {len(keys)} {split} scenes on {world} rank{'s' * (world > 1)} "
              f"in {time.time() - t0:.0f} s -> {path}")
    return table


def codes_of(table, key):
    """The codes (masks, levels) of scene `key` in a codes_table."""
    i = int(torch.searchsorted(table["keys"], key))
    if i >= len(table["keys"]) or int(table["keys"][i]) != key:
        raise KeyError(f"scene {key} is not in the codes table: the data changed since its codes pass")
    return table["codes"][table["start"][i]:table["start"][i + 1]]


def scenes_inputs(items, table, cfg, tasks, extra_none=0, keep_masks=True):
    """(key, scene) pairs -> (their images as the VLM sees them: image_size^2, or at image_size 0
    (a released Qwen-VL's native resolution) as they are, each with its own count of visual
    tokens; their samples (data/tasks.py, img = the scene's position) with the mask words of its
    codes; the scenes as (seed, scene), masks dropped unless keep_masks; the keys). extra_none:
    more no-target phrases a scene (data.tasks.absent_refs)."""
    images, samples, scenes, keys = [], [], [], []
    for k, (key, scene) in enumerate(items):
        seed, codes = scene_seed(scene["id"]), codes_of(table, key)
        if extra_none and "refs" in scene:
            scene = dict(scene, refs=scene["refs"] + absent_refs(seed, scene, extra_none))
        samples += [dict(x, img=k) for x in scene_samples(seed, scene, codes.long().numpy(), tasks)]
        images.append(resize_image(scene["image"], cfg["image_size"]) if cfg["image_size"] else scene["image"])
        scenes.append((seed, scene if keep_masks else {k: v for k, v in scene.items() if k != "masks"}))
        keys.append(key)
    return images, samples, scenes, keys


def buckets(lengths, n, rng, whole=False):
    """Length bucketing within a pool: indices sorted by length (ties in a random order), cut into
    groups of n (whole: full groups only), the groups in a random order."""
    order = sorted(rng.permutation(len(lengths)).tolist(), key=lambda j: lengths[j])
    cuts = [order[a:a + n] for a in range(0, len(order) - (n - 1 if whole else 0), n)]
    return [cuts[b] for b in rng.permutation(len(cuts)).tolist()]


def load_world(split, n, mask_tok, cfg, tasks, extra_none=0, keep_masks=False, shard=True, table=None):
    """The first n scenes of a split of cfg["data"] (data.open_dataset: the shapes world by default),
    in memory -> (images at the VLM's input size (an (n, S, S, 3) array; a list at native
    resolution), samples with their image index, scenes as (seed, scene), each scene's codes).
    extra_none: more no-target phrases a training scene. The masks are only kept for the test
    split (the evaluation decodes against them at each image's own size) or when asked."""
    from data.stream import read_split
    table = table or codes_table(mask_tok, cfg, split, n, shard)
    images, samples, scenes, keys = scenes_inputs(read_split(cfg["data"], split, limit=n), table, cfg, tasks,
                                                  extra_none if split == "train" else 0, split != "train" or keep_masks)
    if not scenes:
        raise UserError(f"--data={cfg['data']}: no usable scene in the {split} split")
    return (np.stack(images) if cfg["image_size"] else images), samples, scenes, [codes_of(table, k) for k in keys]


class ConversationBatches:
    """data.stream's make_batches for Stage 2 (the streamed path): a pool of scenes -> their
    conversations (data.tasks), tokenized, sorted by length and cut into micro-batches of
    batch_size (length bucketing in the pool), in a random order, each collated into model
    inputs and labels: all of it in the DataLoader workers. Each batch also carries n_tok (its
    assistant tokens) and dropped (conversations longer than max_len, counted on a pool's first)."""

    def __init__(self, table, processor, cfg, tasks):
        self.table, self.processor, self.cfg, self.tasks = table, processor, cfg, tasks

    def __call__(self, scenes, rng):
        cfg = self.cfg
        images, samples, _, _ = scenes_inputs(((s["key"], s) for s in scenes), self.table, cfg, self.tasks,
                                              cfg["extra_none"], keep_masks=False)
        convs, dropped = training_conversations(samples, images, self.processor, cfg,
                                                int(rng.integers(1 << 31))) if samples else ([], 0)
        out = []
        for cut in buckets([len(c["ids"]) for c in convs], cfg["batch_size"], rng):
            batch, labels = collate([convs[j] for j in cut], images, self.processor)
            out.append(dict(batch=batch, labels=labels, n_tok=sum(sum(convs[j]["in_loss"]) for j in cut),
                            dropped=dropped if not out else 0))
        return out


def load_prompts(cfg, mask_tok):
    """Stage 3's prompts: the segmentation prompts of the train split of cfg["data"] (Stage 2's samples: same
    templates, same answers - the mask words of the targets from the Stage-1 encoder, or
    "No target."): dicts with task, prompt, answer, targets, img. Returns (images at the VLM's
    input size, prompts, scenes as (seed, scene); masks kept only for the iou reward)."""
    tasks = tuple(cfg["tasks"].split(","))
    images, samples, scenes, _ = load_world("train", cfg["n_train"], mask_tok, cfg, tasks, keep_masks=cfg["reward"] == "iou")
    prompts = segmentation_prompts(samples, scenes)
    if not prompts:
        raise UserError(f"--data={cfg['data']}: no usable prompts for --tasks={cfg['tasks']} in {len(scenes)} train "
                        f"scenes (refer needs referring expressions, gcg grounded descriptions)")
    return images, prompts, scenes


def segmentation_prompts(samples, scenes):
    """The samples GRPO learns from: referring and grounded-conversation prompts; a gcg prompt's
    targets are the objects its grounded phrases point at."""
    prompts = [s for s in samples if s["task"] in ("refer", "gcg")]
    for p in prompts:
        if p["task"] == "gcg":
            p["targets"] = sorted({i for _, _, i in scenes[p["img"]][1]["grounded"]["spans"]})
    return prompts


class PromptBatches:
    """data.stream's make_batches for Stage 3 (the streamed path): a pool of scenes -> batches of
    n segmentation prompts, tokenized, length-bucketed within the pool, in a random order; each
    batch self-contained: prompts (img = an index into its own images), images, scenes (masks
    kept for the iou reward only). Prompts that do not fill a last batch of n wait for another
    epoch, whose shards and pools mix the items differently."""

    def __init__(self, table, processor, cfg, tasks, n):
        self.table, self.processor, self.cfg, self.tasks, self.n = table, processor, cfg, tasks, n

    def __call__(self, items, rng):
        images, samples, scenes, _ = scenes_inputs(((s["key"], s) for s in items), self.table, self.cfg, self.tasks,
                                                   keep_masks=self.cfg["reward"] == "iou")
        prompts = segmentation_prompts(samples, scenes)
        prompts = tokenize_prompts(prompts, images, self.processor) if prompts else []
        out = []
        for cut in buckets([len(p["ids"]) for p in prompts], self.n, rng, whole=True):
            used = list(dict.fromkeys(prompts[j]["img"] for j in cut))
            out.append(dict(prompts=[dict(prompts[j], img=used.index(prompts[j]["img"])) for j in cut],
                            images=[images[i] for i in used], scenes=[scenes[i] for i in used]))
        return out


def prompt_batches(cfg, processor, mask_tok, state, device, memory=None, step=0):
    """Stage 3's prompts, a step at a time: draw() -> (prompts, images, scenes, the step's prompt
    indices), and the stream's Position (None in memory). memory = (images, prompts, scenes): the
    prompts of load_prompts, length-bucketed from the seed (vlm.micro_batches, after the `step`
    steps a resumed run trained). Else streamed (data.stream): the codes pass (sharded over the
    ranks), then batches of batch_size / G prompts with their own images (PromptBatches) read by
    the DataLoader workers. Every rank reads the same prompts either way: all ranks know a
    step's prompts, sample their share of the groups and gather the rest; a step reads the
    images of its batch_size / G prompts, no more."""
    n = cfg["batch_size"] // cfg["num_generations"]
    if memory is not None:
        images, prompts, scenes = memory
        order = micro_batches([len(p["ids"]) for p in prompts], n, cfg["seed"], 16, skip=step)
        return (lambda: (prompts, images, scenes, next(order))), None
    from data.stream import open_stream
    make = PromptBatches(codes_table(mask_tok, cfg, "train", cfg["n_train"]), processor, cfg, tuple(cfg["tasks"].split(",")), n)
    draw, position = open_stream(cfg, make, cfg["pool_scenes"], state.get("stream") if state else None, device)

    def step_batch():
        b = draw()
        return b["prompts"], b["images"], b["scenes"], range(len(b["prompts"]))
    return step_batch, position


def gt_union(scene, targets):
    """The union of a prompt's ground-truth masks, at the scene's own size (no target: empty)."""
    m = scene["masks"]
    return m[targets].any(0) if targets else np.zeros(m.shape[1:], bool)


def tokenize_prompts(prompts, images, processor):
    """Token ids of each prompt (chat template, image expanded), up to and including
    '<|im_start|>assistant\\n': what the policy continues."""
    convs, _ = tokenize([[p] for p in prompts], images, processor, max_len=10 ** 9)
    return [dict(p, ids=c["ids"][:c["n_prompt"]], in_loss=[False] * c["n_prompt"], n_prompt=c["n_prompt"])
            for p, c in zip(prompts, convs)]


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, processor, mask_tok, cfg, n=100, gallery=None):
    """Greedy generation on the first n test scenes, scored through the tokenizer's decoder.
    Reads cfg keys data, image_size, out_dir (codes cache), eval_batch. Returns:
    refer_miou / refer_ciou: GRES-style, prediction = union of the decoded masks vs the union of
      the targets, empty target & empty prediction -> IoU 1; cIoU = sum I / sum U (all referring
      prompts: single, multi and no-target; per kind as refer_miou_<kind>);
    nacc: no-target prompts answered with no mask; exact_match: generated codes == the tokenizer's
      codes of the targets (prompts with targets); caption_attr_acc: colour, shape and size words
      of the object right in the generated region caption (mean over the three);
    tokenizer_ceiling_miou: the same mIoU with decode(encode(targets)): what perfect words give;
    refer_right_object (overall, _tiny < 1.2 % of the image, _medium, _big > 10 %): single-target
      prompts whose prediction overlaps the target best of the scene's objects, with IoU > 0.3;
    refer_level1_exact: single-target prompts whose first word is the tokenizer's level-1 code;
      refer_miou_single_given_level1: their mIoU with that word put in place of the generated one
      (the generated level-2 word kept; no mask = 0): how much of the gap is the first word.
    Masks and metrics are at each scene's own size, whatever size the VLM saw the image at."""
    was_training = model.training
    model.eval()
    images, samples, scenes, codes = load_world("test", n, mask_tok, cfg, ("refer", "caption"), shard=False)  # rank 0 alone
    samples, _ = tokenize([[s] for s in samples], images, processor, max_len=10 ** 9)   # one turn each
    samples = [dict(c["turns"][0], **c) for c in samples]
    refer = [s for s in samples if s["task"] == "refer"]
    caps = [s for s in samples if s["task"] == "caption"]
    t0 = time.time()
    # a mask is 4 tokens: room for every target of the split (at least 6) and the end of turn
    most = max([len(s["targets"]) for s in refer] + [6])
    refer_text = generate(model, processor, refer, images, 4 * most + 2, cfg["eval_batch"])
    # a caption is ~10 words: "a small red circle at the top left."
    cap_text = generate(model, processor, caps, images, 24, cfg["eval_batch"])
    gen_seconds = time.time() - t0

    # Masks are text: parse the generated words (tolerantly: PAPER.md section 2's repairs), then
    # decode them with the Stage-1 decoder over the scene's own image. Per scene one decode call for
    # every predicted mask of every prompt, and one for decode(encode(GT)) = the tokenizer's ceiling.
    # A span without a valid level-1 code (c1 = -1) cannot be decoded: no prediction, as in infer.py.
    pred_codes = [[c for c in text_to_codes(t) if c[0] >= 0] for t in refer_text]
    by_scene = {}
    for k, s in enumerate(refer):
        by_scene.setdefault(s["img"], []).append(k)
    pred_masks, ious, inter, union = [None] * len(refer), np.zeros(len(refer)), 0, 0
    # right: single-target prompt -> (right object?, size, level-1 word right?, IoU given the level-1 word)
    ceiling, right = np.zeros(len(refer)), {}
    for img, ks in progress(by_scene.items(), "decoding masks"):
        image, gt_masks = scenes[img][1]["image"], scenes[img][1]["masks"]
        empty = np.zeros(image.shape[:2], bool)          # no target / no prediction, at the scene's size
        # which of the two words fails: a single-target answer's first mask again, with the
        # tokenizer's own level-1 word in place of the generated one (the generated level-2 kept)
        level1 = {k: int(codes[img][refer[k]["targets"][0], 0]) for k in ks
                  if len(refer[k]["targets"]) == 1 and pred_codes[k]}
        flat = [c for k in ks for c in pred_codes[k]] + [[c1, pred_codes[k][0][1]] for k, c1 in level1.items()]
        dec = mask_tok.decode(image, np.array(flat).reshape(-1, 2)) if flat else empty[None, :0]
        given_level1 = iter(dec[len(flat) - len(level1):])
        rebuilt = mask_tok.decode(image, codes[img].long().numpy())   # decode(encode(GT)), per object
        pos = 0
        for k in ks:
            t = refer[k]["targets"]
            gt = gt_masks[t].any(0) if t else empty
            pred = dec[pos:pos + len(pred_codes[k])].any(0) if pred_codes[k] else empty
            pos += len(pred_codes[k])
            ious[k] = iou(pred[None], gt[None])[0]           # empty GT & empty prediction -> 1
            ceiling[k] = iou((rebuilt[t].any(0) if t else empty)[None], gt[None])[0]
            inter, union = inter + (pred & gt).sum(), union + (pred | gt).sum()
            pred_masks[k] = pred
            if len(t) == 1:
                # the right object: of the scene's objects the prediction overlaps the target best,
                # with IoU > 0.3 (a mask on the wrong object, or a blur over several, is not)
                overlap = iou(np.broadcast_to(pred, gt_masks.shape), gt_masks)
                area = gt.mean()
                size = "tiny" if area < 0.012 else "big" if area > 0.1 else "medium"
                right[k] = (bool(pred.any() and overlap.argmax() == t[0] and overlap[t[0]] > 0.3), size,
                            k in level1 and pred_codes[k][0][0] == level1[k],
                            iou(next(given_level1)[None], gt[None])[0] if k in level1 else 0.0)    # no mask: 0
    hits = {z: [r[0] for r in right.values() if z in ("", r[1])] for z in ("", "tiny", "medium", "big")}
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
            attr_hits.append(said[:1] == [s["obj"].get(key)])
    metrics = dict(
        refer_miou=float(ious.mean()), refer_ciou=float(inter / max(union, 1)),
        **{f"refer_miou_{k}": float(ious[kinds == k].mean()) for k in ("single", "multi", "none") if (kinds == k).any()},
        nacc=float(np.mean([not pred_codes[k] for k in np.flatnonzero(none)])) if none.any() else None,
        exact_match=float(np.mean(exact)) if exact else None,
        caption_attr_acc=float(np.mean(attr_hits)) if attr_hits else None,
        tokenizer_ceiling_miou=float(ceiling.mean()),
        **{"refer_right_object" + (f"_{z}" if z else ""): float(np.mean(v)) if v else None for z, v in hits.items()},
        refer_level1_exact=float(np.mean([r[2] for r in right.values()])) if right else None,
        refer_miou_single_given_level1=float(np.mean([r[3] for r in right.values()])) if right else None,
        eval_scenes=n, eval_refer=len(refer), eval_captions=len(caps), eval_generate_seconds=gen_seconds)
    if gallery:
        shown = [k for k in range(len(refer)) if refer[k]["targets"]][:8]
        save_gallery(gallery, [(scenes[refer[k]["img"]][1], refer[k], ious[k], refer_text[k], pred_masks[k]) for k in shown])
    model.train(was_training)
    return metrics


def save_gallery(path, rows):
    """A PNG of (scene, sample, IoU, generated text, predicted mask) rows: image | ground truth |
    prediction at the scene's own size (shown at least 256 px high), the phrase and words underneath."""
    from PIL import Image, ImageDraw
    strips = []
    for scene, s, score, text, pred in rows:
        image = scene["image"]
        row = np.concatenate([image, overlay(image, scene["masks"][s["targets"]]), overlay(image, pred[None])], 1)
        zoom = max(1, -(-256 // image.shape[0]))
        row = Image.fromarray(row).resize((row.shape[1] * zoom, row.shape[0] * zoom), Image.NEAREST)
        if strips and row.width != strips[0].width:      # scenes of other sizes: one common width
            row = row.resize((strips[0].width, max(1, row.height * strips[0].width // row.width)), Image.NEAREST)
        strip = Image.new("RGB", (row.width, row.height + 28), "white")
        draw = ImageDraw.Draw(strip)
        draw.text((4, 2), f"{s['phrase']}  (IoU {score:.2f})", fill="black")
        draw.text((4, 15), text[:110], fill="gray")
        strip.paste(row, (0, 28))
        strips.append(strip)
    if strips:
        page = Image.new("RGB", (strips[0].width, sum(x.height for x in strips)), "white")
        y = 0
        for x in strips:
            page.paste(x, (0, y))
            y += x.height
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        page.save(path)


def metrics_line(m):
    """The evaluation's headline figures on one line."""
    f = lambda x: "-" if x is None else f"{x:.4f}"
    return (f"referring mIoU {f(m['refer_miou'])} | cIoU {f(m['refer_ciou'])} | N-acc {f(m['nacc'])} "
            f"| exact mask words {f(m['exact_match'])} | right object {f(m['refer_right_object'])}")
