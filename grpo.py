"""
SAMTok Stage 3: reinforcement learning (GRPO) with the textual answer-matching reward.

After SFT (sft.py) the VLM writes masks as words. Stage 3 lets it practise: for each
segmentation prompt it samples a group of G answers, scores each one by "textual answer
matching" - no pixels, no mask decoder: the mask-word spans of a rollout are compared with the
ground-truth answer's, R = N_TP / max(N_pred, N_gt), with N_TP the distinct predicted spans found
in the answer and N_pred counted before de-duplication, so repeating a mask is penalised; a correct
"No target." earns the full reward (PAPER.md section 4) - and moves the policy towards the answers
that beat their group's mean: Group Relative Policy Optimization (DeepSeekMath), advantage
A = (R - mean_group) / std_group, per-token clipped ratio min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
optional k3 KL to the SFT model, and the Dr. GRPO / DAPO variants of the loss aggregation.
Before and after training the model is scored with Stage 2's evaluation on the test split.

Run it (Stage 1 and 2 first: python tokenizer.py && python sft.py):
    python grpo.py                                        # CPU, preset tiny
    python grpo.py --reward=iou                           # compare: match (default) | match_partial | iou
    python grpo.py --device=cuda                          # one GPU
    torchrun --standalone --nproc_per_node=8 grpo.py --preset=paper --data=DATA
    # two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        grpo.py --preset=paper --data=DATA
Options are --key=value (python grpo.py --help lists them): --init_from=FOLDER (a Stage-2 output, default out/sft),
--data=FOLDER (or coco:..., refcoco:..., as in Stage 2) takes the prompts from another dataset,
--loss_type=grpo|dr_grpo|dapo, --scale_rewards=group|none, --beta=0 drops the KL term (and the reference),
--num_iterations=2 reuses each batch of rollouts twice, --fsdp=true shards with FSDP2,
--resume=true continues from out_dir/model. Any --data on disk streams its prompts (data/stream.py).
Writes out_dir/model (save_pretrained: model + processor + optimizer state), out_dir/metrics.json
(before / after evaluation, rewards, throughput) and out_dir/gallery.png (after).
"""

import copy
import math
import os
import re
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

from common import (UserError, adamw, autocast, cleanup, configure, gather, init_distributed, iou, lr_at, print0,
                    read_json, run, set_lr, stop_early, write_json)
from data.stream import streamed
from data.tasks import NO_TARGET
from samtok import load_tokenizer, text_to_codes
from vlm import (banned_tokens, batch_logps, completion_batch, completion_text, evaluate, gt_union, load_model,
                 load_prompts, metrics_line, parallelize, prompt_batches, resolve_init, resume_dir, rollout,
                 save_checkpoint, set_trainable, stage_config, tokenize_prompts, tokenizer_of, unwrap, vision_tower,
                 visual_tokens)

# ----------------------------------------------------------------------------- config
DEFAULTS = dict(
    out_dir="out/grpo",
    init_from="out/sft",        # Stage 2's output folder (or its model/ subfolder): the policy's start
    device="auto",              # auto | cpu | cuda
    seed=0,
    tokenizer_ckpt="out/tokenizer/ckpt.pt",   # Stage 1: the codes of the answers, and the iou reward's decoder
    image_size=128,             # images are resized to image_size^2 px, as in Stage 2 (0: native resolution)
    # prompts: the segmentation tasks of the train split of any data.open_dataset spec, as in Stage 2
    data="shapes",              # the synthetic world; or a jsonl folder, coco:..., refcoco:..., grefcoco:...
    n_train=500,                # the first n scenes of the split (shapes: ~9 referring prompts each)
    stream="auto",              # auto: the shapes world in memory, any --data on disk streamed (data/stream.py) | true | false
    num_workers=2, pool_scenes=64,   # streamed: reader processes; prompts are bucketed in pools of these scenes
    tasks="refer",              # refer (single, multi and no-target) and/or gcg (grounded conversation)
    # rollouts
    num_generations=8,          # G: completions sampled per prompt (paper: 16)
    temperature=1.0,
    max_new_tokens=26,          # refer: up to 6 masks of 4 words + <|im_end|>; a longer rollout is cut ("truncated")
    # reward
    reward="match",             # match (the paper's) | match_partial | iou
    format_weight=0.0,          # + format_weight x (1 if the answer is well-formed and ended)
    # advantages and loss
    scale_rewards="group",      # group: (R - mean) / (std + eps); none: R - mean (Dr. GRPO)
    loss_type="grpo",           # grpo | dr_grpo | dapo: how per-token terms are averaged
    eps_low=0.2, eps_high=0.2,  # the clip range of the ratio: [1 - eps_low, 1 + eps_high] (DAPO: eps_high 0.28)
    beta=0.2,                   # weight of the k3 KL to the frozen start model (0: no reference model at all)
    num_iterations=1,           # mu: policy updates per batch of rollouts (old log-probs kept from the sampling policy)
    share_prefix=True,          # the training forwards run each prompt once for its completions (vlm.shared_prefix_logps)
    # optimisation
    steps=150,                  # rollout steps
    batch_size=64,              # completions per step, all ranks together: batch_size / G prompts per step
    micro_batch=32,             # completions per forward / backward (gradient accumulation over the rest)
    lr=1e-4, min_lr_ratio=0.1, warmup_frac=0.05, weight_decay=0.0, beta2=0.99, grad_clip=1.0,
    freeze_vision=False,        # paper: vision tower frozen (as in SFT)
    fsdp=False,
    grad_checkpointing=False,
    # bookkeeping
    log_every=10, ckpt_every=50, resume=False,
    stop_after=0,               # stop after this many steps of this run (simulates an interruption)
    eval_n=100,                 # test scenes for the evaluations before and after (0: none)
    eval_batch=64,
)
PRESETS = {
    "tiny": {},
    # paper: 16 rollouts per prompt (GCG); the rest is ours. 16 prompts x 16 = 256 completions a step.
    "paper": dict(image_size=0, tasks="refer,gcg", num_generations=16, max_new_tokens=512, steps=1000,
                  batch_size=256, micro_batch=8, lr=1e-6, beta=0.04, min_lr_ratio=1.0, warmup_frac=0.0, beta2=0.999,
                  freeze_vision=True, fsdp=True, grad_checkpointing=True, log_every=1, ckpt_every=50, eval_n=500, eval_batch=32),
}
PAPER_NEEDS = {"paper": dict(data="the prompts' data, e.g. --data='grefcoco:...' (--data=shapes: the toy world)")}
# the paper's textual reward (match), a half-credit variant for the level-1 word, and the pixel IoU
REWARDS = ("match", "match_partial", "iou")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADV_EPS = 1e-4   # the eps of (R - mean) / (std + eps): only keeps a near-zero std from exploding A

# ----------------------------------------------------------------------------- rewards
# Pure functions of text (and, for iou, of masks): the reward is computed from what the model
# wrote, exactly as a grader would read it. Spans are parsed with Stage 1's tolerant parser,
# the same one the evaluation uses, so a span the evaluation would decode is a span here.


def reward_match(text, answer):
    """PAPER.md section 4: R = N_TP / max(N_pred, N_gt). N_TP = distinct predicted spans that occur
    in the ground-truth answer; N_pred counts every predicted span, repeats included (a mask said
    twice counts twice in the denominator, once in the numerator). A ground truth of "No target."
    is answered correctly by exactly that text and no span: full reward."""
    pred, gt = text_to_codes(text), text_to_codes(answer)
    if not gt:
        return float(not pred and text.strip() == NO_TARGET)
    return len(set(pred) & set(gt)) / max(len(pred), len(gt))


def reward_match_partial(text, answer):
    """As reward_match, but a distinct predicted span whose level-1 word matches a ground-truth
    span that no prediction got exactly earns half: level 1 is the coarse mask (a level-1-only
    decode is 0.79 mIoU against 0.82 for both codes), so it is half right. Each ground-truth span
    gives at most one half credit (one-to-one, in order of appearance)."""
    pred, gt = text_to_codes(text), text_to_codes(answer)
    if not gt:
        return float(not pred and text.strip() == NO_TARGET)
    distinct = list(dict.fromkeys(pred))                      # de-duplicated, order kept
    exact = [p for p in distinct if p in gt]
    open_level1 = [g[0] for g in dict.fromkeys(gt) if g not in exact]
    half = 0
    for p in distinct:
        if p not in exact and p[0] >= 0 and p[0] in open_level1:
            open_level1.remove(p[0])
            half += 1
    return (len(exact) + 0.5 * half) / max(len(pred), len(gt))


def reward_iou(pred_union, gt_union):
    """The pixel reward, for comparison: IoU of the union of the decoded predicted masks with the
    union of the ground-truth masks (GRES-style; no target and no prediction -> 1)."""
    return float(iou(pred_union[None], gt_union[None])[0])


_SPAN = re.compile(r"<\|mt_start\|><\|mt_(\d{4})\|><\|mt_(\d{4})\|><\|mt_end\|>")


def reward_format(text, task, finished):
    """1 if the answer is well-formed: it ended (<|im_end|> within max_new_tokens), every mask is
    exactly <|mt_start|> level-1 word, level-2 word <|mt_end|>, and a referring answer is nothing
    but such masks or exactly "No target."; else 0."""
    if not finished:
        return 0.0
    spans = list(_SPAN.finditer(text))
    if not all(int(a) < 256 <= int(b) < 512 for a, b in (m.groups() for m in spans)):
        return 0.0
    rest = _SPAN.sub("", text)
    if "<|mt_" in rest:                       # a mask word outside a well-formed span
        return 0.0
    if task == "refer":
        return float((bool(spans) and not rest.strip()) or (not spans and text.strip() == NO_TARGET))
    return 1.0


def advantages(R, scale="group"):
    """R (groups, G) -> A (groups, G) and which groups have all-equal rewards. Group-relative:
    A = R - mean of the group, divided by the group's std (+ eps) when scale == "group" (GRPO),
    not divided when "none" (Dr. GRPO: the std division over-weights groups that are almost all
    right or all wrong). std is torch's unbiased one, as in TRL."""
    mean, std = R.mean(1, keepdim=True), R.std(1, keepdim=True)
    A = R - mean
    if scale == "group":
        A = A / (std + ADV_EPS)
    return A, (R == R[:, :1]).all(1)

# ----------------------------------------------------------------------------- the loss
def policy_loss(logp, old_logp, ref_logp, adv, mask, cfg, n_seqs, n_tokens, weight=None):
    """The GRPO objective of one micro-batch, as a loss (to minimise). logp, old_logp, ref_logp
    (N, L): log-probs of the sampled tokens under the policy, the policy that sampled them and
    the frozen reference (None when beta = 0); adv (N,); mask (N, L) 1 on completion tokens.
    Per token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta k3, r = exp(logp - old_logp),
    k3 = exp(ref - logp) - (ref - logp) - 1 (an unbiased, always positive estimate of KL(pi || ref)).
    Aggregation, with n_seqs / n_tokens counted over the WHOLE step (all micro-batches, all ranks),
    so that summing micro-batches gives the loss of the step:
      grpo:    mean over sequences of the mean over each sequence's tokens
      dr_grpo: sum over all tokens / (n_seqs * max_new_tokens), a constant: no length bias
      dapo:    sum over all tokens / n_tokens, every token of the batch weighs the same
    weight (N,), optional: per-sequence multiplier (0 drops a row). Returns (loss, stats) with
    stats = sums over tokens of [k3 KL, low-clipped, high-clipped, tokens].
    Values outside the mask are never used, whatever they are: in a right-aligned batch a short
    completion's window starts inside its prompt, where a token may be one the policy can never
    write (<|vision_end|>: log-prob -inf, and -inf - -inf is NaN, which 0 x NaN would not hide)."""
    off = mask == 0
    logp, old_logp = logp.masked_fill(off, 0.0), old_logp.masked_fill(off, 0.0)
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]
    clipped = torch.clamp(ratio, 1 - cfg["eps_low"], 1 + cfg["eps_high"])
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if cfg["beta"] > 0:
        d = ref_logp.masked_fill(off, 0.0) - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg["beta"] * kl
    w = mask if weight is None else mask * weight[:, None]
    if cfg["loss_type"] == "grpo":
        loss = ((per_token * w).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif cfg["loss_type"] == "dr_grpo":
        loss = (per_token * w).sum() / (n_seqs * cfg["max_new_tokens"])
    else:
        loss = (per_token * w).sum() / n_tokens
    with torch.no_grad():
        # which tokens the clip actually bit: ratio below 1 - eps_low with A < 0, above 1 + eps_high with A > 0
        low = ((ratio < 1 - cfg["eps_low"]) & (A < 0)).float()
        high = ((ratio > 1 + cfg["eps_high"]) & (A > 0)).float()
        stats = torch.stack([((kl if kl is not None else torch.zeros_like(logp)) * w).sum(),
                             (low * w).sum(), (high * w).sum(), w.sum()])
    return loss, stats


# ----------------------------------------------------------------------------- scoring the rollouts
def score_rollouts(rows, prompts, cfg, decode=None, gt_union=None):
    """Rewards of completions: rows are dicts with prompt (index), text, finished. For the iou
    reward, decode(img, codes (M, 2)) -> the decoded masks (M, H, W) and gt_union(prompt) -> the
    union of its ground-truth masks (H, W); one decode call per image for all its rollouts (the
    G completions of a prompt share the image, so the tokenizer encodes it once)."""
    R = [0.0] * len(rows)
    if cfg["reward"] == "iou":
        codes = [[c for c in text_to_codes(r["text"]) if c[0] >= 0] for r in rows]
        by_img = {}
        for k, r in enumerate(rows):
            by_img.setdefault(prompts[r["prompt"]]["img"], []).append(k)
        for img, ks in by_img.items():
            # each distinct mask once: the G rollouts of a prompt often repeat a mask
            distinct = list(dict.fromkeys(c for k in ks for c in codes[k]))
            masks = dict(zip(distinct, decode(img, np.array(distinct).reshape(-1, 2)))) if distinct else {}
            gts = {}
            for k in ks:
                j = rows[k]["prompt"]
                gt = gts[j] = gts[j] if j in gts else gt_union(prompts[j])
                pred = np.any([masks[c] for c in codes[k]], 0) if codes[k] else np.zeros_like(gt)
                R[k] = reward_iou(pred, gt)
    for k, r in enumerate(rows):
        p = prompts[r["prompt"]]
        if cfg["reward"] == "match":
            R[k] = reward_match(r["text"], p["answer"])
        elif cfg["reward"] == "match_partial":
            R[k] = reward_match_partial(r["text"], p["answer"])
        if cfg["format_weight"]:
            R[k] += cfg["format_weight"] * reward_format(r["text"], p["task"], r["finished"])
    return R

# ----------------------------------------------------------------------------- one update
def update(net, opt, rows, prompts, images, processor, cfg, rank=0, world=1, ref=None, lr=None, visual=None, times=None):
    """num_iterations optimizer steps on one batch of rollouts. rows: the step's completions that
    carry a loss (main drops the groups of all-equal rewards when beta = 0: their advantage is 0),
    every rank holding the same list, each a dict with prompt, ids (completion token ids) and adv.
    Rows are cut into micro-batches of micro_batch completions; micro-batch j goes to rank j % world.
    Every rank runs the same number of forward / backward passes (a rank left without a micro-batch
    runs the first one with weight 0), so DDP's and FSDP's collectives line up. Returns the step's stats summed over ranks: [KL, low-clipped,
    high-clipped, tokens]. times (a dict, optional) receives the seconds of each part."""
    device, times = next(net.parameters()).device, {} if times is None else times

    def lap(part, t0):                  # seconds since t0 into times[part], the GPU's queue drained first
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[part] = times.get(part, 0.0) + time.time() - t0
        return time.time()
    chunks = [rows[i:i + cfg["micro_batch"]] for i in range(0, len(rows), cfg["micro_batch"])]
    per_rank = math.ceil(len(chunks) / world)
    my_chunks = [(chunks[j], 1.0) if j < len(chunks) else (chunks[0], 0.0) for j in range(rank, per_rank * world, world)]
    # the normalisers of the loss count the whole step, so the micro-batch losses add up to it
    n_seqs, n_tokens = len(rows), sum(len(r["ids"]) for r in rows)
    # The shared prefix (vlm.shared_prefix_logps): a micro-batch's completions run on one forward
    # of each of its prompts, the image included, instead of one forward of prompt + completion
    # each. Gradient checkpointing drops the key/value cache in training: then nothing is shared.
    share = cfg["share_prefix"] and not cfg["grad_checkpointing"]
    batches = [dict(completion_batch(chunk, prompts, images, processor, share, device, visual),
                    adv=torch.tensor([r["adv"] for r in chunk], device=device),
                    weight=torch.full((len(chunk),), w, device=device)) for chunk, w in my_chunks]
    model = unwrap(net)
    bias = banned_tokens(processor, model.get_output_embeddings().weight.shape[0], device)
    logps = lambda m, b: batch_logps(m, b, cfg["temperature"], bias)
    t = time.time()
    with torch.no_grad():
        for b in batches:
            # mu > 1: the log-probs of the policy that sampled (pi_old), kept through the mu updates.
            # mu = 1: pi_old is the policy itself, so ratio = 1 and the clip never bites (taken below).
            b["old"] = logps(net, b) if cfg["num_iterations"] > 1 else None
            b["ref"] = logps(ref, b) if ref is not None else None
    t, stats = lap("reference", t), torch.zeros(4, device=device)
    for it in range(cfg["num_iterations"]):
        if lr is not None:
            set_lr(opt, lr(it))
        for k, b in enumerate(batches):
            # DDP all-reduces gradients on the last micro-batch only; FSDP2 reduce-scatters every one
            # (skipping it would keep unsharded gradient sums on every rank, as in sft.py)
            if isinstance(net, torch.nn.parallel.DistributedDataParallel):
                net.require_backward_grad_sync = k == len(batches) - 1
            logp = logps(net, b)
            old = b["old"] if b["old"] is not None else logp.detach()
            loss, s = policy_loss(logp, old, b["ref"], b["adv"], b["mask"], cfg, n_seqs, n_tokens, b["weight"])
            t = lap("policy forward", t)
            (loss * world).backward()           # DDP / FSDP average gradients over ranks: undo it
            t = lap("backward", t)
            if it == cfg["num_iterations"] - 1:
                stats += s
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = lap("optimizer", t)
    if world > 1:
        dist.all_reduce(stats)
    return stats

# ----------------------------------------------------------------------------- the phases of main
def check_options(cfg, world):
    """Options that cannot work, as one line each, before anything is loaded or written."""
    G, B, tasks = cfg["num_generations"], cfg["batch_size"], cfg["tasks"].split(",")
    prompts = B // max(G, 1)                 # the table is built whole: no division by a G of 0
    for bad, why in (
            (cfg["reward"] not in REWARDS, f"--reward={cfg['reward']!r}: choose one of {', '.join(REWARDS)}"),
            (cfg["loss_type"] not in LOSS_TYPES, f"--loss_type={cfg['loss_type']!r}: choose one of {', '.join(LOSS_TYPES)}"),
            (cfg["scale_rewards"] not in ("group", "none"), f"--scale_rewards={cfg['scale_rewards']!r}: choose group or none"),
            (not set(tasks) <= {"refer", "gcg"}, f"--tasks takes a comma list of refer, gcg; got {cfg['tasks']!r}"),
            (G < 2, f"--num_generations={G}: GRPO compares completions within a group, it needs G >= 2"),
            (B % max(G, 1), f"--batch_size={B} is not a multiple of --num_generations={G}: every prompt's group of G "
                    f"completions must be in the same step"),
            (prompts % world, f"--batch_size={B} gives {prompts} prompts a step, not a multiple of the {world} "
                               f"processes: each rank samples the same number of prompts"),
            (cfg["max_new_tokens"] < 1, f"--max_new_tokens={cfg['max_new_tokens']}: a rollout needs at least one token"),
            (cfg["temperature"] <= 0, f"--temperature={cfg['temperature']}: sampling needs a temperature > 0"),
            (min(cfg[k] for k in ("num_iterations", "micro_batch", "steps")) < 1, "--num_iterations/--micro_batch/--steps >= 1"),
            (not 0 <= cfg["eps_low"] < 1 or min(cfg["eps_high"], cfg["beta"]) < 0, "need 0 <= eps_low < 1, eps_high >= 0, beta >= 0")):
        if bad:
            raise UserError(why)


def load_start(cfg, device):
    """The Stage-1 tokenizer, the prompts, and the policy: Stage 2's model (what it kept frozen
    stays frozen: the tiny preset's whole tower, read from its stage_config.json), or this stage's
    own checkpoint when resuming. -> (mask_tok, init folder, (images, prompts, scenes) in memory or
    None when streamed, model, processor, train state or None)."""
    init = resolve_init(cfg["init_from"])
    # what Stage 2 decided about the vision tower carries over, said as it is inherited
    cfg["tower_frozen"] = bool(stage_config(init).get("tower_frozen"))
    print0(f"inherited from {init}: tower_frozen={cfg['tower_frozen']}")
    # decodes on the same device (iou reward, evaluation); a released model brings its own tokenizer
    mask_tok = load_tokenizer(tokenizer_of(cfg, init, DEFAULTS["tokenizer_ckpt"])).to(device)
    src, state = (None, None)
    if cfg["resume"]:
        src, state = resume_dir(os.path.join(cfg["out_dir"], "model"))
        if state["config"].get("stage") != "grpo":
            raise UserError(f"--resume: {src} is not a GRPO checkpoint")
    model, processor = load_model(src or init, cfg)
    if streamed(cfg):               # the prompts come with each step (vlm.prompt_batches)
        return mask_tok, init, None, model, processor, state
    images, prompts, scenes = load_prompts(cfg, mask_tok)
    return mask_tok, init, (images, tokenize_prompts(prompts, images, processor), scenes), model, processor, state


def evaluate_before(cfg, model, processor, mask_tok, init, step, device):
    """Stage 2's evaluation of the start policy (rank 0), kept on disk so a resumed run reports it."""
    path = os.path.join(cfg["out_dir"], "before.json")
    before = read_json(path) if cfg["resume"] and os.path.exists(path) else None
    if before is None:
        m, p = load_model(init, cfg) if step else (model, processor)   # resumed: the start model itself
        with autocast(device):
            before = evaluate(m.to(device), p, mask_tok, cfg, n=cfg["eval_n"])
        write_json(path, before)
    print(f"before: {metrics_line(before)}", flush=True)
    return before


def gather_rows(rows, batch_prompts, G, world):
    """Every rank's scored completions, on every rank, in the step's order: prompt i was sampled
    by rank i % world, as its (i // world)-th."""
    gathered = gather(rows, world)
    return [r for i in range(len(batch_prompts)) for r in gathered[i % world][i // world * G:(i // world + 1) * G]]


def step_record(step, R, equal, stats, kl, rows, times, t_upd, seconds):
    """What history.json keeps of a step: rewards, the KL and clip fractions per token, lengths, and
    where the step's time went (profile: sampling, reward, reference, policy forward, backward, optimizer)."""
    tokens = max(float(stats[3]), 1.0)
    return dict(step=step, reward=float(R.mean()), reward_std=float(R.std(1).mean()),
                frac_reward_zero_std=float(equal.float().mean()), kl=float(stats[0]) / tokens if kl else None,
                clip_low=float(stats[1]) / tokens, clip_high=float(stats[2]) / tokens,
                length=float(np.mean([len(r["ids"]) for r in rows])), truncated=float(np.mean([not r["finished"] for r in rows])),
                completions=len(rows), gen_seconds=times["sampling"], update_seconds=t_upd, seconds=seconds, profile=times)


def log_line(window, step, steps, lr, ref):
    """One line for the last log_every steps: reward and its spread, the clip fractions, KL,
    lengths, ms/step with the share of sampling, completions/s."""
    # zero-std: the share of groups whose G rewards are all equal, which teach nothing but the KL
    w = {k: np.mean([x[k] for x in window]) for k in ("reward", "reward_std", "frac_reward_zero_std",
                                                      "clip_low", "clip_high", "length", "truncated")}
    secs = sum(x["seconds"] for x in window)
    kl = f"{np.mean([x['kl'] for x in window]):.4f}" if ref is not None else "-"
    return (f"step {step:4d}/{steps} | reward {w['reward']:.3f} std {w['reward_std']:.3f} "
            f"| zero-std {w['frac_reward_zero_std']:.2f} | kl {kl} | clip lo {w['clip_low']:.3f} "
            f"hi {w['clip_high']:.3f} | len {w['length']:.1f} trunc {w['truncated']:.2f} | lr {lr:.1e} "
            f"| {1000 * secs / len(window):.0f} ms/step ({100 * sum(x['gen_seconds'] for x in window) / secs:.0f}% "
            f"sampling) | {sum(x['completions'] for x in window) / secs:.0f} completions/s")


def finish(cfg, history, before, mask_tok, device, t_start):
    """The reward curve, the throughput and the evaluation after (the model as saved, loaded fresh,
    as infer.py or a user would): metrics.json and gallery.png."""
    # the learning curve in two numbers: the mean reward of the first and of the last tenth of the steps
    out, k, secs = cfg["out_dir"], max(1, len(history) // 10), max(sum(h["seconds"] for h in history), 1e-9)
    metrics = dict(before=before, after=None,
                   reward_first=float(np.mean([h["reward"] for h in history[:k]])),
                   reward_last=float(np.mean([h["reward"] for h in history[-k:]])), reward_window_steps=k,
                   completions_per_s=sum(h["completions"] for h in history) / secs,
                   sampling_fraction=sum(h["gen_seconds"] for h in history) / secs, train_seconds=secs,
                   frac_reward_zero_std=float(np.mean([h["frac_reward_zero_std"] for h in history])),
                   profile={k: sum(h["profile"].get(k, 0.0) for h in history) / secs for k in history[-1]["profile"]},
                   steps=cfg["steps"], reward=cfg["reward"], loss_type=cfg["loss_type"], preset=cfg["preset"])
    if cfg["eval_n"]:
        m, p = load_model(os.path.join(out, "model"), cfg)
        with autocast(device):
            metrics["after"] = evaluate(m.to(device), p, mask_tok, cfg, n=cfg["eval_n"], gallery=os.path.join(out, "gallery.png"))
        print(f"after:  {metrics_line(metrics['after'])}")
    metrics["wall_seconds"] = time.time() - t_start      # this process, start to end: loading, both evaluations
    write_json(os.path.join(out, "metrics.json"), metrics)
    print("where a step's time went: " + ", ".join(f"{k} {v:.0%}" for k, v in metrics["profile"].items()))
    print(f"reward {metrics['reward_first']:.3f} -> {metrics['reward_last']:.3f} (mean of the first / last {k} steps) "
          f"| {metrics['completions_per_s']:.0f} completions/s | trained in {metrics['train_seconds']:.0f} s "
          f"| wrote {out}/model, {out}/metrics.json")


def prepare_policy(model, processor, images, cfg, init, step, world, device, state):
    """The frozen reference (with the KL term only: the start model, also on resume; FSDP2: sharded,
    bf16 on GPU), what trains (as Stage 2 decided), DDP / FSDP2, AdamW (its state restored on
    resume), and a frozen tower's tokens of every training image (the tiny preset: a fixed function
    of the image, the same in the reference), computed once. -> (net, opt, ref, visual or None)."""
    ref = parallelize((load_model(init, cfg)[0] if step else copy.deepcopy(model)).to(device).eval().requires_grad_(False),
                      cfg, world, device, frozen=True) if cfg["beta"] > 0 else None
    set_trainable(model, cfg)
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # before the sharding: the tower runs here on its own, outside the root module's FSDP forward
    frozen = not any(p.requires_grad for p in vision_tower(model).parameters())
    visual = visual_tokens(model.to(device), processor, images, device) if frozen and images is not None else None
    net = parallelize(model, cfg, world, device)
    opt = adamw(net.parameters(), cfg["lr"], cfg["weight_decay"], cfg["beta2"])
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    return net, opt, ref, visual


def sample_and_score(model, processor, mask_tok, prompts, images, scenes, my_prompts, cfg, gen, device, world, visual):
    """G completions for each of this rank's prompts (vlm.rollout: one shared prefill a prompt),
    each scored from its text alone (the iou reward decodes over each scene's own image).
    -> (this rank's rows, the seconds of sampling and of the reward)."""
    G, t0 = cfg["num_generations"], time.time()
    # sampled in eval mode (as the policy is deployed), trained in train mode, from the same weights
    model.eval()
    with autocast(device):
        comps = rollout(model, processor, [prompts[j] for j in my_prompts], images, G, cfg["max_new_tokens"],
                        cfg["temperature"], gen, sync=cfg["fsdp"] and world > 1, visual=visual)
    model.train()
    t_gen, t0 = time.time() - t0, time.time()
    rows = [dict(prompt=j, ids=c["ids"], finished=c["finished"], text=completion_text(processor, c["ids"]))
            for j, c in zip([j for j in my_prompts for _ in range(G)], comps)]
    decode = lambda img, codes: mask_tok.decode(scenes[img][1]["image"], codes)
    truth = lambda p: gt_union(scenes[p["img"]][1], p["targets"])
    for r, x in zip(rows, score_rollouts(rows, prompts, cfg, decode, truth)):
        r["reward"] = x
    return rows, dict(sampling=t_gen, reward=time.time() - t0)


# ----------------------------------------------------------------------------- main
def main():
    t_start = time.time()
    from transformers.utils import logging
    logging.disable_progress_bar()      # one line per step, not a bar per weight file
    cfg = configure(DEFAULTS, PRESETS, doc=__doc__, required=PAPER_NEEDS)
    check_options(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = init_distributed(cfg["device"])
    torch.manual_seed(cfg["seed"])
    print0("config:", cfg)
    mask_tok, init, memory, model, processor, state = load_start(cfg, device)
    G, step, model_dir = cfg["num_generations"], state["step"] if state else 0, os.path.join(cfg["out_dir"], "model")
    print0(f"policy: {init if not step else model_dir}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
           f"parameters | prompts: {dict(Counter(p['task'] for p in memory[1])) if memory else 'streamed'} | G={G}, "
           f"{cfg['batch_size'] // G} prompts = {cfg['batch_size']} completions a step" + (f" | resuming from step {step}" if step else ""))
    before = evaluate_before(cfg, model, processor, mask_tok, init, step, device) if rank == 0 and cfg["eval_n"] else None
    if world > 1:
        dist.barrier()
    net, opt, ref, visual = prepare_policy(model, processor, memory and memory[0], cfg, init, step, world, device, state)
    hist_path = os.path.join(cfg["out_dir"], "history.json")
    history = read_json(hist_path)[:step] if step and os.path.exists(hist_path) else []

    # ---- the loop: every rank draws the same prompts (vlm.prompt_batches) and samples the
    # completions of its share; rewards and completions are then gathered, so every rank knows
    # the whole step: the advantages, which groups carry a loss, the loss normalisers
    draw, position = prompt_batches(cfg, processor, mask_tok, state, device, memory, step)
    steps, mu, run_steps, window, gen = cfg["steps"], cfg["num_iterations"], 0, [], torch.Generator(device=device)
    while step < steps:
        # sampling and rewards: G completions a prompt, scored from their text alone
        t_step, (prompts, images, scenes, batch_prompts) = time.time(), draw()     # in memory, or this step's own
        gen.manual_seed(cfg["seed"] * 1_000_003 + step * world + rank)
        rows, times = sample_and_score(model, processor, mask_tok, prompts, images, scenes, batch_prompts[rank::world],
                                       cfg, gen, device, world, visual)
        rows = gather_rows(rows, batch_prompts, G, world)
        if not any(r["finished"] for r in rows):   # nothing is written: earlier checkpoints stay
            raise UserError(f"no rollout of step {step + 1} ended within --max_new_tokens={cfg['max_new_tokens']}: the "
                            f"policy never ends its answer with <|im_end|>; raise --max_new_tokens or check --init_from")
        # group-relative advantages: A = (R - mean of the group) / std of the group
        R = torch.tensor([r["reward"] for r in rows]).view(-1, G)
        A, equal = advantages(R, cfg["scale_rewards"])
        for r, a in zip(rows, A.flatten().tolist()):
            r["adv"] = a
        # A group of equal rewards has A = 0: no policy-gradient loss, so without the KL term it is
        # not even forwarded. With the KL term (beta > 0) it stays: the KL to the start model must
        # also hold where the reward says nothing.
        kept = [r for g in range(len(R)) if not equal[g] or ref is not None for r in rows[g * G:(g + 1) * G]]
        # the update: mu optimizer steps on this batch of rollouts, the lr set before each
        lr = lambda it: lr_at(step * mu + it, steps * mu, cfg["lr"], cfg["warmup_frac"], cfg["min_lr_ratio"])
        lr_now, t_upd = lr(0), time.time()
        with autocast(device):
            stats = update(net, opt, kept, prompts, images, processor, cfg, rank, world, ref, lr, visual, times) \
                if kept else torch.zeros(4)
        step, run_steps, t_upd = step + 1, run_steps + 1, time.time() - t_upd
        # timing and logging
        history.append(step_record(step, R, equal, stats, ref is not None, rows, times, t_upd, time.time() - t_step))
        window.append(history[-1])
        if step % cfg["log_every"] == 0 or step == steps or step == 1:
            print0(log_line(window, step, steps, lr_now, ref), flush=True)
            window = []
        # checkpoint and termination conditions
        if step % cfg["ckpt_every"] == 0 or step == steps:
            save_checkpoint(net, opt, processor, dict(cfg, stage="grpo"), step, model_dir, position and position.gathered())
            if rank == 0:
                write_json(hist_path, history)
        if stop_early(cfg, run_steps, step, steps):
            return
    cleanup()
    if rank == 0:
        finish(cfg, history, before, mask_tok, device, t_start)


if __name__ == "__main__":
    run(main)
