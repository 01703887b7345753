"""
SAMTok Stage 1: train the mask tokenizer (samtok.py), any region mask -> two codes -> the mask.

"We represent any mask with two words." Training follows PAPER.md section 1: the image encoder
and the prompt encoder are frozen; the new mask encoder, SAM2's mask decoder and the codebooks
(EMA, not gradient) learn; loss = 2.0 x sigmoid BCE + 0.5 x Dice + 1.0 x commitment, on one
of SAM2's three multimask outputs: the best one (tiny), or the one the frozen IoU head picks
(paper, as the authors' code does).

The embedded default (preset tiny) has no pretrained SAM2 to start from, so it runs in phases:
  1. SAM2 pretraining with box prompts on the synthetic shapes world (the analogue of the paper
     starting from SAM2.1), saved and reused;
  2. a warm-up through the *unquantized* latent z, with the frozen image features cached once;
  3. k-means on the collected latents initialises both codebooks (level 2 on the residuals), and
     training goes on through the residual VQ with EMA codebooks and dead-code restarts.
The paper preset loads SAM2.1 (--sam2_ckpt) instead of phase 1 and has no warm-up.

Run it:
    python tokenizer.py                                    # CPU, preset tiny
    python tokenizer.py --device=cuda                      # one GPU
    torchrun --standalone --nproc_per_node=8 tokenizer.py --preset=paper --sam2_ckpt=sam2.1_hiera_large.pt \
        --data=sa1b:/data/sa1b
    # two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        tokenizer.py --preset=paper --sam2_ckpt=sam2.1_hiera_large.pt --data=sa1b:/data/sa1b
Any option is --key=value (python tokenizer.py --help lists them); --resume=true continues from
out_dir/ckpt.pt, the data stream included. Any --data on disk streams (data/stream.py:
--num_workers readers a rank, nothing kept that grows with the data); the shapes world of the
tiny preset is held in memory with its cache of image features. Writes out_dir/ckpt.pt (weights
+ config), out_dir/metrics.json and out_dir/recon.png (per test scene: image, input masks, 2-code and level-1-only rebuilds).
"""

import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UserError, adamw, atomic_save, autocast, configure, init_distributed, iou, is_master, lr_at, overlay,
                    print0, progress, random_states, read_checkpoint, restore_random, run, set_lr, stop_early,
                    write_json)
from data.masks import MaskBatches, MaskSet, data_spec, load_split, mask_sets
from data.stream import open_stream, streamed
from samtok import SAMTok, load_sam2_checkpoint

# ----------------------------------------------------------------------------- config
DEFAULTS = dict(
    out_dir="out/tokenizer",
    device="auto",              # auto | cpu | cuda
    seed=0,
    # model (samtok.SAMTokConfig): SAM2 from the sam2 package's own config file, with dotlist overrides
    sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml",
    sam2_overrides="trunk.embed_dim=32,trunk.num_heads=1,trunk.stages=[1,2,3,1],"
                   "trunk.global_att_blocks=[4,5],trunk.window_spec=[8,4,4,2],"
                   "trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    sam2_ckpt="",               # official sam2.1_hiera_*.pt; empty: pretrain on the data (tiny)
    image_size=128,             # plain resize to image_size x image_size (aspect ratio not kept)
    d_model=128,                # SAM2 prompt/decoder width = latent dim of z and the codebooks
    mlp_dim=1024,               # MLP width of the two-way transformers
    levels=2, codebook_size=256,
    # data
    data="shapes",              # data.open_dataset spec: shapes | FOLDER (jsonl) | coco:JSON:IMAGES | sa1b:FOLDER | ...
    n_train=4000, n_val=100, n_test=500,   # scenes (in memory) / the first n items of the reader (streamed)
    stream="auto",              # auto: the shapes world in memory, any --data on disk streamed (data/stream.py) | true | false
    num_workers=2, pool_batches=16,   # streamed: reader processes; batches are cut from pools of this many batches
    cache_features=True,        # in memory: the frozen image encoder's features computed once, reused
    # SAM2 pretraining with box prompts (only without --sam2_ckpt)
    pretrain_steps=500, pretrain_batch=16, pretrain_lr=1e-3,   # batches count images
    pretrain_dense_box=0.5,     # fraction of pretraining boxes also drawn as a dense mask prompt
    # the tokenizer itself
    steps=1600, batch_size=16, grad_accum=1,   # images per step per process, with their masks
    masks_per_image=0,          # 0: every mask of each image; else a random subset of this many
    lr=5e-4, weight_decay=0.05, beta2=0.999, grad_clip=1.0, warmup_frac=0.05,
    unquantized_steps=300,      # warm-up through the continuous latent before k-means + VQ
    kmeans_samples=8192,
    bce_weight=2.0, dice_weight=0.5, commitment_weight=1.0,
    ema_decay=0.99, dead_threshold=0.05,
    loss_res=128,               # 0: logits' own resolution (paper); else upsample logits to this
    train_prompt_encoder=True,  # paper: frozen (pretrained); tiny: our SAM2 never saw mask prompts
    train_iou_head=True,        # paper: frozen; tiny: learned so best-of-3 selection works
    loss_on="best",             # best: the best of the 3 outputs (SAM's); chosen: the one the IoU head picks
    mask_threshold=0.0,         # decode threshold on logits (the released scripts use 0.5)
    eval_every=500, log_every=50, ckpt_every=500, resume=False,
    stop_after=0,               # stop after this many steps of this run (simulates an interruption)
)
# tiny: a narrow Hiera pretrained here, 128 px, every mask of an image, the warm-up, a trained
# prompt encoder and IoU head (this SAM2 never saw mask prompts); paper: SAM2.1 Hiera-L at 1024 px,
# the released config's lr, the frozen heads, the logits compared at their own resolution.
PRESETS = {
    "tiny": {},
    # the paper's global batch of 1,024 masks: 16 images x 8 masks a GPU x 8 GPUs
    "paper": dict(sam2_config="configs/sam2.1/sam2.1_hiera_l.yaml", sam2_overrides="",
                  image_size=1024, d_model=256, mlp_dim=2048, cache_features=False, num_workers=6,
                  pretrain_steps=0, steps=129_000, batch_size=16, masks_per_image=8, lr=4e-5, unquantized_steps=0,
                  kmeans_samples=16384, dead_threshold=1.0, loss_res=0, train_prompt_encoder=False,
                  train_iou_head=False, loss_on="chosen", mask_threshold=0.5, eval_every=5000, ckpt_every=2000,
                  n_train=10_000_000, n_val=200, n_test=1000),
}
PAPER_NEEDS = {"paper": dict(data="the masks to train on, e.g. --data=sa1b:/data/sa1b (--data=shapes: the toy world)",
                             sam2_ckpt="SAM2.1, e.g. --sam2_ckpt=sam2.1_hiera_large.pt (none: a random image encoder)")}
SAM2_KEYS = ("sam2_config", "sam2_overrides", "image_size", "d_model", "mlp_dim")   # what shapes the weights


# ----------------------------------------------------------------------------- loss and metrics
def mask_loss(logits, iou_pred, gt, cfg):
    """2.0 x sigmoid BCE + 0.5 x Dice on one of the 3 multimask outputs (loss_on: best = the lowest
    loss, SAM's min-over-outputs; chosen = the one the IoU head rates best, the authors' choice for
    a frozen head), plus MSE of the IoU head against each output's true IoU (when it trains).
    -> (loss, the true IoU of the output the IoU head picks: what decode() returns)."""
    # The decoder paints logits at 4x its stride-16 grid (256 x 256 at 1024 px, 32 x 32 at 128 px).
    # The paper compares them with the ground truth nearest-resized down to that grid; the tiny
    # preset upsamples the logits instead, since a 32 x 32 target cannot hold a small shape.
    if cfg["loss_res"]:
        logits = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    else:  # paper: GT nearest-resized to the logits' resolution
        gt = F.interpolate(gt[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0] > 0.5
    t = gt[:, None].float().expand_as(logits)
    # per pixel, sigmoid cross-entropy; per mask, Dice = 1 - (2 sum(p t) + 1) / (sum p + sum t + 1),
    # which weighs a small mask as much as a large one (BCE alone would let a tiny object vanish)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-1, -2))  # (B, 3)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-1, -2)) + 1) / (p.sum((-1, -2)) + t.sum((-1, -2)) + 1)
    per = cfg["bce_weight"] * bce + cfg["dice_weight"] * dice
    # SAM's answer to ambiguity: of the three outputs only one is trained, so the three can
    # specialise (part, object, group) instead of all averaging to one blur
    pick = per.argmin(1) if cfg["loss_on"] == "best" else iou_pred.argmax(1)
    loss = per[torch.arange(len(per)), pick].mean()
    with torch.no_grad():
        pred = logits > cfg["mask_threshold"]
        true_iou = (pred & (t > 0)).sum((-1, -2)).float() / (pred | (t > 0)).sum((-1, -2)).float().clamp(min=1)
        chosen_iou = true_iou[torch.arange(len(per)), iou_pred.argmax(1)].mean()
    # decode() keeps the output the IoU head rates best: the head learns to rate them by their true
    # IoU (the paper freezes it, a pretrained SAM2's head already rates well)
    if cfg["train_iou_head"]:
        loss = loss + F.mse_loss(iou_pred.float(), true_iou)
    return loss, chosen_iou


# mask area as a fraction of the image: under 0.5 % the paper reports IoU 0.37-0.90, at 3-7 % about
# 0.99, so a single mIoU hides where a tokenizer fails
AREA_BUCKETS = [(0.0, 0.005, "<0.5%"), (0.005, 0.02, "0.5-2%"), (0.02, 0.1, "2-10%"), (0.1, 1.01, ">10%")]


@torch.no_grad()
def evaluate(model, ms, cfg, batch=64, level1=False, return_preds=False, boxes=False):
    """Encode -> two codes -> decode every mask of a MaskSet; IoU at the model's resolution.
    level1=True drops level 2 (code -1) before decoding; boxes=True skips the tokenizer and
    prompts SAM2 with the true box (the pretraining check). -> ious (M,), codes (M, L), preds."""
    was_training = model.training
    model.eval()
    S, dev = cfg["image_size"], model.device
    ious, codes_all, preds = [], [], []
    for start in progress(range(0, len(ms), batch), "evaluating", total=-(-len(ms) // batch)):
        idx = torch.arange(start, min(start + batch, len(ms)))
        scenes, inv = ms.scene[idx].unique(return_inverse=True)  # each image through the encoder once
        embed, hires = model.image_embeddings(model.image_features(model.preprocess(ms.images[scenes.numpy()])))
        embed, hires = embed[inv], [h[inv] for h in hires]
        # the tokenizer's round trip, as decode() runs it: mask + box -> z -> codes -> e1 + e2 -> logits
        if boxes:
            codes = torch.zeros(len(idx), cfg["levels"], dtype=torch.long)
            logits, iou_pred = model.box_logits(embed, hires, ms.boxes[idx].to(dev))
        else:
            z = model.encode_latent(embed, ms.prompts[idx].to(dev), ms.boxes[idx].to(dev))
            codes = model.rvq.quantize(z)[0]
            if level1:                   # code -1 = level missing: the coarse mask of level 1 alone
                codes[:, 1:] = -1
            if bool(model.rvq.initialized):   # before k-means (the warm-up) z itself is decoded
                z = model.rvq.embed(codes)
            logits, iou_pred = model.decode_logits(embed, hires, z)
        # best of 3 by predicted IoU, upsampled bilinearly, thresholded on the raw logits
        best = logits[torch.arange(len(idx)), iou_pred.argmax(1)][:, None]
        up = F.interpolate(best.float(), size=(S, S), mode="bilinear", align_corners=False)[:, 0]
        pred = (up > cfg["mask_threshold"]).cpu()
        ious.append(iou(pred.numpy(), ms.masks[idx].numpy()))
        codes_all.append(codes.cpu())
        if return_preds:
            preds.append(pred)
    model.train(was_training)
    return np.concatenate(ious), torch.cat(codes_all), (torch.cat(preds) if return_preds else None)


def val_miou(model, cfg, boxes=False):
    """The mIoU of evaluate() over the val split, read a chunk of scenes at a time."""
    return float(np.concatenate([evaluate(model, ms, cfg, boxes=boxes)[0] for ms in mask_sets(cfg, "val")]).mean())


def save_grid(path, ms, preds, preds_l1, n_scenes=8):
    """A PNG: per test scene, the image, the input masks, the 2-code and the level-1 rebuilds."""
    # what a reader should look at: the level-1 column is the coarse word alone, the 2-code column
    # what the second word adds (edges, thin parts, which of two touching shapes)
    from PIL import Image, ImageDraw
    rows = []
    for s in range(min(n_scenes, len(ms.images))):
        img, sel = ms.images[s], (ms.scene == s).nonzero()[:, 0]
        rows.append(np.concatenate([img] + [overlay(img, m[sel].numpy()) for m in (ms.masks, preds, preds_l1)], 1))
    grid = np.concatenate(rows, 0)
    img = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    page = Image.new("RGB", (img.width, img.height + 24), "white")
    draw, w = ImageDraw.Draw(page), img.width // 4
    for i, title in enumerate(["image", "input masks", "2 codes -> masks", "level 1 only"]):
        draw.text((i * w + 6, 6), title, fill="black")
    page.paste(img, (0, 24))
    page.save(path)


# ----------------------------------------------------------------------------- phase 1: SAM2 pretraining
# Only without --sam2_ckpt: no pretrained SAM2 exists for the synthetic world, so one is learnt,
# SAM-style, from box prompts. The prompt -> mask task forces the image encoder to learn what an
# object is; the tokenizer later relies on exactly these features (frozen).
class BoxPrompted(nn.Module):
    """The pretraining forward, images in (the image encoder trains too), as a module DDP can wrap."""
    # (SAMTok.forward is the tokenizer's; DDP runs a module's forward, so pretraining gets its own)
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, boxes, img_idx, dense_box):
        embed, hires = self.model.image_embeddings(self.model.image_features(x))
        embed, hires = embed[img_idx], [h[img_idx] for h in hires]    # per image above, per mask below
        return self.model.box_logits(embed, hires, boxes, dense_box)


def pretrain_sam2(model, draw, cfg, gen, wrap, device):
    """SAM2's image encoder, prompt encoder and mask decoder learn box prompt -> mask."""
    # the same loss as the tokenizer's (BCE + Dice on the best of 3, the IoU head's MSE), so the
    # decoder the tokenizer inherits already speaks the loss it will be trained with
    parts = [model.image_encoder, model.sam_prompt_encoder, model.sam_mask_decoder]
    params = [p for m in parts for p in m.parameters()] + [model.no_mem_embed]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad = True
    opt = torch.optim.AdamW(params, lr=cfg["pretrain_lr"], weight_decay=0.01)
    # each step: a few images, their masks' boxes jittered as SAM jitters them (5 % of the box size),
    # half of them also drawn as a dense prompt; the image encoder trains inside the forward here
    net, steps, t0 = wrap(BoxPrompted(model)), cfg["pretrain_steps"], time.time()
    for i in range(steps):
        lr = set_lr(opt, lr_at(i, steps, cfg["pretrain_lr"], cfg["warmup_frac"]))
        b = draw(cfg["pretrain_batch"])
        x, box, img_idx = model.preprocess(b["images"]), b["boxes"], b["img_idx"]
        wh = (box[:, 2:] - box[:, :2]).repeat(1, 2)
        box = box + 0.05 * wh * torch.randn(box.shape, generator=gen)  # SAM's box jitter
        with autocast(device):
            dense_box = torch.rand(len(box), generator=gen) < cfg["pretrain_dense_box"]
            logits, iou_pred = net(x, box.to(device), img_idx.to(device), dense_box.to(device))
            loss, tr_iou = mask_loss(logits.float(), iou_pred, b["masks"].to(device), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        if i % cfg["log_every"] == 0 or i == steps - 1:
            dt = (time.time() - t0) / (i + 1)
            print0(f"sam2 pretrain {i:5d} | loss {loss.item():.4f} | iou {tr_iou.item():.3f} | lr {lr:.2e} "
                   f"| {dt * 1000:.0f} ms/step | {len(box) / dt:.0f} masks/s")
    if is_master():
        print(f"sam2 pretrain val | box-prompt mIoU (corner points only) {val_miou(model, cfg, boxes=True):.4f}")


def sam2_weights(model, cfg, resumed, draw, gen, wrap, device):
    """Phase 1, the SAM2 weights: from the resumed checkpoint, an official SAM2.1 file, a saved
    pretraining of the same settings, or pretrained here (then saved for reuse)."""
    path = os.path.join(cfg["out_dir"], "sam2_pretrained.pt")
    # a saved pretraining is reused only when everything that shaped it is the same
    meta = {k: cfg[k] for k in cfg if k in SAM2_KEYS + ("data", "n_train", "seed") or k.startswith("pretrain_")}
    # (so changing a tokenizer option reruns only the tokenizer, not its few minutes of SAM2)
    if resumed is not None:
        print0("SAM2 weights: the resumed checkpoint's")
    elif cfg["sam2_ckpt"]:
        load_sam2_checkpoint(model, cfg["sam2_ckpt"])
    elif os.path.exists(path) and (saved := read_checkpoint(path))["meta"] == meta:
        model.load_state_dict(saved["model"], strict=False)
        print0(f"reusing the pretrained SAM2 in {path}")
    elif cfg["pretrain_steps"] > 0:
        pretrain_sam2(model, draw, cfg, gen, wrap, device)
        if is_master():
            sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("mask_encoder", "query", "rvq"))}
            atomic_save({"stage": "sam2", "meta": meta, "model": sd}, path)
            print(f"saved the pretrained SAM2 to {path}")
    else:
        print0("warning: no --sam2_ckpt and pretrain_steps=0: the image encoder stays random")
    # every rank seeded its random parts differently (each draws its own masks): start from rank 0's
    if torch.distributed.is_initialized():
        for p in model.parameters():
            torch.distributed.broadcast(p.data, 0)          # rank 0's weights everywhere


# ----------------------------------------------------------------------------- phases 2-3 and the test
def freeze_for_tokenizer(model, cfg):
    """Frozen: the image encoder (and no_mem_embed); the prompt encoder and the IoU / object-score
    heads as configured (the paper freezes them). -> the trainable parameters."""
    # The paper's split: SAM2 already knows images and prompts, so its image encoder and prompt
    # encoder stay as they are; what must learn is the new mask encoder (mask -> z), and SAM2's
    # mask decoder, which has never been prompted by a code vector. The codebooks are not in the
    # optimiser at all: they follow their EMA (quantizer.py).
    dec = model.sam_mask_decoder
    frozen = [model.image_encoder, model.no_mem_embed] + ([] if cfg["train_prompt_encoder"] else [model.sam_prompt_encoder])
    frozen += [] if cfg["train_iou_head"] else [dec.iou_prediction_head, dec.pred_obj_score_head]
    model.requires_grad_(True)
    for m in frozen:
        m.requires_grad_(False)
    model.image_encoder.eval()  # frozen: no dropout / drop-path noise in its features
    return [p for p in model.parameters() if p.requires_grad]


def feature_source(model, ms, cfg, device):
    """batch -> the frozen encoder's FPN features. With cache_features and the data in memory (ms)
    they are computed once (fp16) for every training image: the frozen encoder gives the same
    features every epoch; streamed, every batch's images go through the encoder."""
    # the cache is exact because nothing varies an image between epochs (no augmentation): the
    # tiny preset's 4,000 images take a few seconds once instead of the encoder's forward every step
    def encode(images):                 # uint8 (n, S, S, 3) -> the 3 FPN levels, no gradient
        with torch.no_grad(), autocast(device):
            return model.image_features(model.preprocess(images))
    if ms is None or not cfg["cache_features"]:    # the paper preset: millions of 1024 px images
        return lambda b: [f.float() for f in encode(b["images"])]
    t0, starts = time.time(), range(0, len(ms.images), 64)
    chunks = [[f.half() for f in encode(ms.images[i:i + 64])] for i in progress(starts, "caching image features")]
    cache = [torch.cat([c[level] for c in chunks]) for level in range(3)]
    print0(f"cached image features: {sum(c.numel() * 2 for c in cache) / 2 ** 20:.0f} MB in {time.time() - t0:.1f} s")
    return lambda b: [c[b["scenes"]].to(device).float() for c in cache]


@torch.no_grad()
def kmeans_codebooks(model, draw, cfg, features, device):
    """Data-driven codebooks: k-means on latents of the warmed-up encoder, residual per level."""
    # Random codebooks would leave most codes far from every latent, never chosen, restarted again
    # and again; k-means on latents the warmed-up encoder really produces puts level 1 where they
    # are, and level 2 (on the residuals z - e1) where level 1 errs.
    zs = []
    while sum(map(len, zs)) < cfg["kmeans_samples"]:
        b = draw(64)
        embed, _ = model.image_embeddings(features(b))
        zs.append(model.encode_latent(embed[b["img_idx"]], b["prompts"].to(device), b["boxes"].to(device)).float())
    model.rvq.init_codebooks(torch.cat(zs))
    return len(torch.cat(zs))


def test(model, cfg, train_seconds):
    """The test split: reconstruction mIoU with both codes and with level 1 only, by mask area,
    codebook usage and perplexity, throughput; writes metrics.json and recon.png."""
    # by area, as the paper reports it: tiny masks (< 0.5 % of the image) are the weak point of a
    # 2-word code, and of SAM2's decoder resolution (docs/LOG.md has the ideal-logit reference)
    out, ious, ious1, codes, area, seconds, grid = cfg["out_dir"], [], [], [], [], 0.0, None
    for ms in mask_sets(cfg, "test"):           # a chunk of scenes at a time, whatever the split's size
        t0 = time.time()
        i, c, preds = evaluate(model, ms, cfg, return_preds=grid is None)
        seconds += time.time() - t0
        i1, _, preds1 = evaluate(model, ms, cfg, level1=True, return_preds=grid is None)
        grid = grid or (ms, preds, preds1)      # the picture shows the first chunk's scenes
        ious, ious1, codes, area = ious + [i], ious1 + [i1], codes + [c], area + [ms.area.numpy()]
    ious, ious1, codes, area = np.concatenate(ious), np.concatenate(ious1), torch.cat(codes), np.concatenate(area)
    masks_per_s = len(ious) / seconds
    counts = torch.stack([torch.bincount(codes[:, l], minlength=cfg["codebook_size"]) for l in range(cfg["levels"])]).float()
    health = model.rvq.health(counts)
    by_area = {name: float(ious[(area >= lo) & (area < hi)].mean()) if ((area >= lo) & (area < hi)).any() else None
               for lo, hi, name in AREA_BUCKETS}
    metrics = {"recon_miou": float(ious.mean()), "recon_miou_level1": float(ious1.mean()), "recon_miou_by_area": by_area,
               "usage": health["usage"], "perplexity": health["perplexity"], "masks_per_s": masks_per_s,
               "train_seconds": train_seconds, "test_masks": len(ious), "preset": cfg["preset"]}
    write_json(os.path.join(out, "metrics.json"), metrics)
    save_grid(os.path.join(out, "recon.png"), *grid)
    print(f"test: recon mIoU {metrics['recon_miou']:.4f} (level 1 only {metrics['recon_miou_level1']:.4f}) "
          f"on {len(ious)} masks | by area " + ", ".join(f"{k} {v:.3f}" for k, v in by_area.items() if v is not None))
    print(f"test: usage {health['usage']} | perplexity {[round(p, 1) for p in health['perplexity']]} | {masks_per_s:.0f} "
          f"masks/s | trained in {train_seconds:.0f} s\nwrote {out}/ckpt.pt, {out}/metrics.json, {out}/recon.png")


# ----------------------------------------------------------------------------- main
def training_data(cfg, rank, world, gen, device, resumed):
    """Where the training batches come from: -> (draw(n) -> a batch dict (MaskSet.gather's keys),
    the split in memory or None, the stream's Position or None). In memory (stream=false, and the
    default shapes world under auto): the split as one MaskSet, n random images a draw, with the
    feature cache. Streamed (any --data on disk under auto: the paper's path): data/stream.py's
    shards over ranks and workers, batch_size images a draw, nothing kept that grows with the data."""
    if not streamed(cfg):
        train_ms = MaskSet(load_split(cfg, "train"), cfg["image_size"])
        print0(f"data: in memory, {len(train_ms.images)} train images / {len(train_ms)} masks")
        return (lambda n: train_ms.gather(*train_ms.sample(n, cfg["masks_per_image"], gen))), train_ms, None
    (spec, cap), workers, B = data_spec(cfg), cfg["num_workers"], cfg["batch_size"]
    draw, position = open_stream(cfg, MaskBatches(B, cfg["image_size"], cfg["masks_per_image"]), cfg["pool_batches"] * B,
                                 resumed.get("stream") if resumed else None, device, rank, world, spec, cap)
    print0(f"data: streamed from {cfg['data']} by {max(workers, 1)} reader{'s' * (workers > 1)} a rank, pools of "
           f"{cfg['pool_batches'] * B} images; the image features are computed every step")
    return (lambda n: draw()), None, position


def resume(model, cfg, ckpt_path):
    """--resume: the weights of out_dir/ckpt.pt; -> the checkpoint (step, optimizer state)."""
    # The codebooks and their EMA state are buffers of the model, so they resume with the weights;
    # the model config must be the one the checkpoint was trained with (SAM2_KEYS).
    if not os.path.exists(ckpt_path):
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    resumed = read_checkpoint(ckpt_path)
    if any(resumed["config"][k] != cfg[k] for k in SAM2_KEYS):
        raise UserError(f"--resume: {ckpt_path} was trained with another model config")
    model.load_state_dict(resumed["model"])
    print0(f"resuming from step {resumed['step']}")
    return resumed


# The loop below trains through the VQ straight-through: the decoder sees e1 + e2, the encoder
# receives the decoder's gradient as if quantisation were the identity, the commitment loss pulls
# z towards e1 and e1 + e2, and the codebooks move by EMA and dead-code restarts inside the forward
# (quantizer.py), on every rank alike.
def main():
    cfg = configure(DEFAULTS, PRESETS, doc=__doc__, required=PAPER_NEEDS)
    if cfg["loss_on"] not in ("best", "chosen"):             # checked once, before anything is loaded
        raise UserError(f"--loss_on takes best or chosen, got {cfg['loss_on']!r}")
    rank, world, device = init_distributed(cfg["device"])
    torch.manual_seed(cfg["seed"] + rank)
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)  # each rank draws its own masks
    t_start, ckpt_path = time.time(), os.path.join(cfg["out_dir"], "ckpt.pt")
    print0("config:", cfg)
    model = SAMTok(cfg).to(device)
    resumed = resume(model, cfg, ckpt_path) if cfg["resume"] else None
    draw, train_ms, position = training_data(cfg, rank, world, gen, device, resumed)          # phase 0
    step = resumed["step"] if resumed else 0
    print0(f"global batch: {cfg['batch_size'] * cfg['grad_accum'] * world} images a step, "
           f"{'all' if not cfg['masks_per_image'] else cfg['masks_per_image']} masks an image")
    # DDP when torchrun started us; parameters unused in a phase are allowed
    wrap = lambda m: m if world == 1 else torch.nn.parallel.DistributedDataParallel(
        m, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    sam2_weights(model, cfg, resumed, draw, gen, wrap, device)                              # phase 1
    params = freeze_for_tokenizer(model, cfg)
    opt = adamw(params, cfg["lr"], cfg["weight_decay"], cfg["beta2"])
    if resumed is not None and "optimizer" in resumed:
        opt.load_state_dict(resumed["optimizer"])
    # the frozen encoder's features of each training image, once (tiny preset) or every step (paper)
    features, net, amp = feature_source(model, train_ms, cfg, device), wrap(model), autocast(device)

    # ---- phases 2 and 3: the warm-up through the continuous latent, then through the residual VQ
    B, A, steps, t0, run_steps = cfg["batch_size"], cfg["grad_accum"], cfg["steps"], time.time(), 0
    restore_random(resumed, gen, rank, world, device)       # --resume: each rank's draws go on where they stopped
    model.rvq.reset_window()
    while step < steps:
        if step == cfg["unquantized_steps"] and not bool(model.rvq.initialized):
            n = kmeans_codebooks(model, draw, cfg, features, device)
            print0(f"step {step}: codebooks initialised by k-means on {n} latents")
        quantize = step >= cfg["unquantized_steps"]         # the warm-up trains through z itself
        # determine and set the learning rate for this step
        lr = set_lr(opt, lr_at(step, steps, cfg["lr"], cfg["warmup_frac"]))
        # forward backward update, with gradient accumulation
        for micro in range(A):
            b = draw(B)
            with amp:
                logits, iou_pred, commit, codes = net(features(b), b["prompts"].to(device), b["boxes"].to(device),
                                                      b["img_idx"].to(device), quantize)
                loss, tr_iou = mask_loss(logits.float(), iou_pred, b["masks"].to(device), cfg)
                loss = (loss + commit) / A
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, run_steps = step + 1, run_steps + 1
        # timing and logging: loss, commitment, IoU, codebook usage, ms/step, masks/s
        if rank == 0 and (step % cfg["log_every"] == 0 or step == steps):
            dt, h = (time.time() - t0) / run_steps, model.rvq.health()
            print(f"step {step:5d} {'quant' if quantize else 'latent':6s} | loss {loss.item() * A:.4f} | commit "
                  f"{commit.item():.4f} | iou {tr_iou.item():.3f} | usage {'/'.join(f'{u:.0%}' for u in h['usage'])} "
                  f"| lr {lr:.2e} | {dt * 1000:.0f} ms/step | {len(b['masks']) * A * world / dt:.0f} masks/s")
            model.rvq.reset_window()
        # evaluate on the val split and write checkpoints
        if rank == 0 and cfg["eval_every"] and step % cfg["eval_every"] == 0 and step < steps:
            print(f"step {step:5d} val | recon mIoU {val_miou(model, cfg):.4f}"
                  + ("" if quantize else " (unquantized)"))
        if step % cfg["ckpt_every"] == 0 or step == steps:
            rng = random_states(gen, world, device)            # every rank's, gathered on all of them
            at = position.gathered() if position else None     # where every shard of the stream stands
            if rank == 0:
                atomic_save({"stage": "tokenizer", "config": cfg, "model": model.state_dict(),
                             "optimizer": opt.state_dict(), "step": step, "rng": rng, "stream": at}, ckpt_path)
                write_json(os.path.join(cfg["out_dir"], "config.json"), cfg)  # the effective config, beside it
        # termination conditions
        if stop_early(cfg, run_steps, step, steps):
            return
    if rank == 0:
        test(model, cfg, time.time() - t_start)


if __name__ == "__main__":
    run(main)
