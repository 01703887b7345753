"""
The GPU check (python bench.py --gpu_check): one command, designed for < 5 minutes on one H200,
random-init models of the real sizes, nothing downloaded. Tokenizer training at SAM2.1 Hiera-L /
1024 px (masks/s), SFT at Qwen2.5-VL-3B size in bf16 (tokens/s and MFU), GRPO's rollout phase on
the same model (completions/s). With --dry_run the same code runs at tiny sizes on the CPU (the
tests run that).

Kept identical to the stages: each part runs the stage's own code path - tokenizer.py's model,
freezing, loss and AdamW; sft.py's collate, vocabulary surgery, token loss and AdamW with the
paper's frozen vision tower; vlm.collate's left-padded prompts for generation - and times whole
steps after warm-up steps, the GPU synchronised at both ends. The mask words are random codes:
a speed check needs the right token counts and shapes, not the Stage-1 tokenizer.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

import sft
import tiny_vlm
import tokenizer
from bench import sync, table
from common import adamw, autocast, configure
from data.tasks import conversations, scene_samples, text_corpus
from samtok import SAMTok
from vlm import collate, decoder_layers, micro_batches, set_trainable, tokenize, vision_tower

# Qwen2.5-VL-3B's published configuration, built through tiny_vlm.build_model (which uses global
# attention in every vision block: at 448 px a window of 112 px would only save a little work).
QWEN25_VL_3B = dict(hidden_size=2048, n_layers=36, n_heads=16, n_kv_heads=2, intermediate_size=11008,
                    vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420, patch_size=14,
                    tie_embeddings=True, vocab_pad=151_936)
TINY_VLM = dict(hidden_size=64, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=128, vision_hidden=32,
                vision_depth=1, vision_heads=2, vision_intermediate=64, bpe_vocab=600, vision_pretrain_steps=0)
DRY_RUN = dict(gpu_steps=2, gpu_warmup=1, gpu_tok_images=2, gpu_tok_masks=2, gpu_sft_batch=2, gpu_sft_image=64,
               gpu_gen_prompts=2, gpu_gen_group=2, gpu_gen_tokens=4)


def random_code_world(n):
    """n train scenes with SFT samples whose mask words are random codes: what a speed check
    needs (the right token counts and shapes) without running the Stage-1 tokenizer."""
    from data import iter_scenes
    scenes = list(iter_scenes("train", n))
    rng = np.random.default_rng(0)
    samples = []
    for k, (seed, s) in enumerate(scenes):
        codes = rng.integers(0, 256, (len(s["masks"]), 2))
        samples += [dict(x, img=k) for x in scene_samples(seed, s, codes, ("refer", "caption", "gcg"))]
    return np.stack([s["image"] for _, s in scenes]), samples, scenes


def seconds_a_step(step, n, warmup, device):
    """Runs step() warmup + n times; -> seconds per step over the last n."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t) / n


def gpu_tokenizer(cfg, device, dry):
    """Stage-1 training steps at SAM2.1 Hiera-L / 1024 px (--preset=paper of tokenizer.py): the
    frozen image encoder under no_grad, the mask encoder, the RVQ and the SAM2 decoder learning,
    loss 2 BCE + 0.5 Dice + commitment, bf16 autocast on GPU. Masks are random boxes."""
    tcfg = configure(tokenizer.DEFAULTS, tokenizer.PRESETS,
                     ["--image_size=64", "--d_model=32", "--mlp_dim=64"] if dry else ["--preset=paper"])
    with torch.device(device):
        model = SAMTok(tcfg)
    model.train()
    # frozen as the paper freezes them: the image encoder, the prompt encoder, the IoU and object-score
    # heads (the paper preset's own settings; the dry run's tiny preset would train the last three)
    params = tokenizer.freeze_for_tokenizer(model, dict(tcfg, train_prompt_encoder=False, train_iou_head=False))
    model.rvq.init_codebooks(torch.randn(4 * tcfg["codebook_size"], tcfg["d_model"], device=device))
    opt = adamw(params, tcfg["lr"], tcfg["weight_decay"], tcfg["beta2"])
    S, g, I, M = tcfg["image_size"], model.grid, cfg["gpu_tok_images"], cfg["gpu_tok_masks"]
    gen = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (I, S, S, 3), dtype=torch.uint8, device=device, generator=gen)
    lo = torch.rand(I * M, 2, device=device, generator=gen) * 0.6 * S
    hi = lo + (0.1 + 0.3 * torch.rand(I * M, 2, device=device, generator=gen)) * S
    boxes = torch.cat([lo, hi], 1).floor()                                       # (I*M, 4) xyxy
    c = torch.arange(S, device=device) + 0.5
    gt = ((c[None, :, None] > boxes[:, 1, None, None]) & (c[None, :, None] < boxes[:, 3, None, None])
          & (c[None, None, :] > boxes[:, 0, None, None]) & (c[None, None, :] < boxes[:, 2, None, None]))
    # the mask prompt at 4x the feature grid, as tokenizer.MaskSet draws it
    prompts = F.interpolate(gt[:, None].float(), size=(4 * g, 4 * g), mode="bilinear", antialias=True)
    img_idx = torch.arange(I, device=device).repeat_interleave(M)
    amp = autocast(device)

    def step():
        with torch.no_grad(), amp:       # frozen encoder: features without a graph (paper: not cached)
            fpn = [f.float() for f in model.image_features(model.preprocess(images))]
        with amp:
            logits, iou_pred, commit, _ = model(fpn, prompts, boxes, img_idx)
            loss, _ = tokenizer.mask_loss(logits.float(), iou_pred, gt, tcfg)
        (loss + commit).backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = seconds_a_step(step, cfg["gpu_steps"], cfg["gpu_warmup"], device)
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt
    return dict(image_size=S, images_per_step=I, masks_per_step=I * M, ms_per_step=dt * 1e3, masks_per_s=I * M / dt,
                params_m=n_params / 1e6)


def vlm_flops(model, convs, batches, image_tokens, vision_trained):
    """Training FLOPs of a step's worth of sequences: 6 x (matmul parameters) per token for the
    LLM (input embedding excluded, LM head included), plus attention 12 x layers x width x n^2
    per sequence of n (forward + backward, no causal discount: the PaLM convention); the vision
    tower the same per patch when it trains, a third of it (forward only) when it is frozen."""
    lm = decoder_layers(model)
    llm_params = sum(p.numel() for p in lm.parameters()) + model.get_output_embeddings().weight.numel()
    vis_params = sum(p.numel() for p in vision_tower(model).parameters())
    d, L = model.config.text_config.hidden_size, len(lm)
    dv, Lv = model.config.vision_config.hidden_size, model.config.vision_config.depth
    patches = 4 * image_tokens            # the merger joins 2 x 2 patches into one LLM token
    flops = 0.0
    for mb in batches:
        for j in mb:
            n = len(convs[j]["ids"])
            flops += 6 * llm_params * n + 12 * L * d * n * n
            flops += (6 * vis_params * patches + 12 * Lv * dv * patches * patches) / (1 if vision_trained else 3)
    return flops


def gpu_sft(cfg, device, dry):
    """sft.py's training step (vlm.collate, sft.token_loss, its AdamW) at Qwen2.5-VL-3B size in
    bf16 autocast, on the synthetic world's conversations with random mask codes. As the paper
    (and --preset=paper of sft.py): vision tower frozen, projector (merger) and LLM trained."""
    over = dict(TINY_VLM if dry else QWEN25_VL_3B, image_size=cfg["gpu_sft_image"], batch_size=cfg["gpu_sft_batch"],
                freeze_vision=True)
    scfg = configure(sft.DEFAULTS, sft.PRESETS, [f"--{k}={v}" for k, v in over.items()])
    images, samples, scenes = random_code_world(16 if dry else 64)
    processor = tiny_vlm.build_processor(scfg, text_corpus([s for _, s in scenes]))
    torch.manual_seed(0)
    t = time.time()
    with torch.device(device):      # random init straight on the GPU (minutes on CPU at 3B)
        model = tiny_vlm.build_model(scfg, processor)
        word_ids = torch.tensor(sft.add_mask_tokens(model, processor)[1:-1])
    build_s = time.time() - t
    convs, _ = tokenize(conversations(samples, scfg["turns"], 0), images, processor, scfg["max_len"])
    stream = micro_batches([len(c["ids"]) for c in convs], scfg["batch_size"], 0, scfg["bucket_pool"])
    set_trainable(model, scfg)
    model.config.use_cache = False          # training: no KV cache, as in sft.py
    model.train()
    opt = adamw(model.parameters(), scfg["lr"], scfg["weight_decay"], scfg["beta2"])
    amp = autocast(device)
    used, tokens = [], [0]
    image_tokens = (scfg["image_size"] // scfg["patch_size"]) ** 2 // 4     # (S / patch)^2 patches, merged 2 x 2

    def step():
        mb = next(stream)
        used.append(mb)
        batch, labels = collate([convs[j] for j in mb], images, processor)
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens[0] += int(batch["attention_mask"].sum())
        with amp:
            loss, _ = sft.token_loss(model, batch, labels.to(device), word_ids)
        # token_loss sums; the step's loss is the mean over its assistant tokens, as in sft.py
        n_tok = int((labels[:, 1:] != -100).sum())
        (loss / max(n_tok, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), scfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    # warm-up steps (kernel choice, allocator growth) count neither in the time nor in the tokens and FLOPs
    for _ in range(cfg["gpu_warmup"]):
        step()
    used.clear()
    tokens[0] = 0
    dt = seconds_a_step(step, cfg["gpu_steps"], 0, device)
    tok_s = tokens[0] / (dt * cfg["gpu_steps"])
    flops = vlm_flops(model, convs, used, image_tokens, not scfg["freeze_vision"]) / (dt * cfg["gpu_steps"])
    n_params = sum(p.numel() for p in model.parameters())
    peak = cfg["peak_tflops"] * 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del opt
    return model, processor, images, convs, dict(
        params_b=n_params / 1e9, build_seconds=build_s, conversations_per_step=scfg["batch_size"],
        tokens_per_step=tokens[0] / cfg["gpu_steps"], ms_per_step=dt * 1e3, tokens_per_s=tok_s,
        model_tflops=flops / 1e12, mfu=flops / peak, mfu_6n=6 * n_params * tok_s / peak, peak_mem_gib=mem)


def gpu_generation(cfg, device, model, processor, images, convs):
    """GRPO's rollout phase: G sampled completions for each prompt (the referring prompts' first
    turn), batched with left padding, in bf16, max gpu_gen_tokens new tokens each."""
    model = model.to(torch.bfloat16)        # rollouts read bf16 weights (autocast would recast every step)
    model.eval()
    model.config.use_cache = True           # sampling: each new token reads the KV cache
    P, G, T = cfg["gpu_gen_prompts"], cfg["gpu_gen_group"], cfg["gpu_gen_tokens"]
    # each conversation's first prompt, up to '<|im_start|>assistant\n': what a rollout continues
    prompts = [dict(c, ids=c["ids"][:c["n_prompt"]], in_loss=[False] * c["n_prompt"]) for c in convs[:P]]
    inputs, _ = collate(prompts, images, processor, left_pad=True)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    text_tok = processor.tokenizer
    new = []

    def step():
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=G,
                                 max_new_tokens=T, pad_token_id=text_tok.pad_token_id)
        new.append(out.shape[1] - inputs["input_ids"].shape[1])     # the longest completion's new tokens

    dt = seconds_a_step(step, max(1, cfg["gpu_steps"] // 4), 1, device)
    return dict(prompts=P, group=G, max_new_tokens=T, seconds_per_batch=dt, completions_per_s=P * G / dt,
                new_tokens_per_s=P * G * new[-1] / dt)


def measure(cfg, device):
    """The three parts in turn, each guarded: one that runs out of memory records the error and
    the others still run. With cfg["dry_run"] the tiny sizes of DRY_RUN, on the CPU."""
    dry = cfg["dry_run"]
    if dry:
        cfg = dict(cfg, **DRY_RUN)
    t0 = time.time()
    out = {"dry_run": dry, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    rows = []

    def guarded(name, fn):
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as e:     # a figure that does not fit is a figure too
            torch.cuda.empty_cache()
            out[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            return None

    tk = guarded("gpu_tokenizer", lambda: gpu_tokenizer(cfg, device, dry))
    if tk:
        out["gpu_tokenizer"] = tk
        rows.append([f"tokenizer training, {'tiny' if dry else 'SAM2.1-L'}, {tk['image_size']} px ({tk['params_m']:.0f} M)",
                     f"{tk['images_per_step']} images / "
                     f"{tk['masks_per_step']} masks", f"{tk['ms_per_step']:.0f} ms/step", f"{tk['masks_per_s']:.0f} masks/s"])
    if device.type == "cuda":                # the SFT's own peak memory, not the tokenizer's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    res = guarded("gpu_sft", lambda: gpu_sft(cfg, device, dry))
    if res:
        model, processor, images, convs, sf = res
        out["gpu_sft"] = sf
        mem = "" if sf["peak_mem_gib"] is None else f", peak {sf['peak_mem_gib']:.0f} GiB"
        rows.append([f"SFT, {'tiny VLM' if dry else 'Qwen2.5-VL-3B size'} ({sf['params_b'] * 1e3:.1f} M), bf16{mem}",
                     f"{sf['tokens_per_step']:.0f} tokens",
                     f"{sf['ms_per_step']:.0f} ms/step", f"{sf['tokens_per_s']:.0f} tokens/s, MFU {sf['mfu']:.1%} "
                     f"(6N: {sf['mfu_6n']:.1%})"])
        gen = guarded("gpu_generation", lambda: gpu_generation(cfg, device, model, processor, images, convs))
        if gen:
            out["gpu_generation"] = gen
            rows.append(["GRPO generation, same model, bf16", f"{gen['prompts']} prompts x G={gen['group']}",
                         f"{gen['seconds_per_batch']:.2f} s/batch", f"{gen['completions_per_s']:.1f} completions/s, "
                         f"{gen['new_tokens_per_s']:.0f} tokens/s"])
    out["seconds"] = time.time() - t0
    print(table(["check", "batch", "time", "throughput"], rows))
    print(f"{'dry run (tiny sizes, CPU)' if dry else out['device']}: {out['seconds']:.0f} s in all")
    return {"gpu_check": out}
