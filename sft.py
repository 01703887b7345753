"""
SAMTok Stage 2: supervised fine-tuning of a vision-language model that writes masks as words.

"We represent any mask with two words." The Stage-1 tokenizer (tokenizer.py) turns any region
mask into two codes, written <|mt_start|><|mt_00xx|><|mt_0yyy|><|mt_end|>. Here a Qwen-VL model
gets those 514 words as ordinary new vocabulary (vocabulary surgery, PAPER.md section 2: no
architecture change) and learns, with nothing but next-token cross-entropy on the assistant's
tokens, the tasks of section 3 (data/tasks.py): referring / generalized segmentation (phrase ->
the mask words of every target, or "No target."), region captioning (mask words in the prompt ->
a caption) and grounded conversation (<|object_ref_start|>phrase<|object_ref_end|> followed by
the phrase's mask words). There is no mask decoder and no mask loss in the VLM: at test time the
generated words go back through the tokenizer's decoder, and the masks are scored against the
ground truth (vlm.evaluate).

The embedded default (preset tiny) builds a small Qwen3-VL from its config classes
(tiny_vlm.py), so that everything it saves loads with plain transformers (AutoProcessor /
AutoModelForImageTextToText). Its LM learns from scratch in minutes, so it also gets two hints
the paper's does not need: the target of a code word keeps half its weight and spreads the other
half over the words whose codes lie nearest (--word_soft, word_targets), since the decoder paints
nearly the same mask from a nearby code; and each epoch deals the referring samples twice
(--refer_repeat), the task whose words must be found in the image rather than read in the prompt.
The paper preset starts from a released Qwen2.5-VL instead, with the plain loss and the data's own
mixture (--word_soft=0 --refer_repeat=1).

Run it (the Stage-1 tokenizer first: python tokenizer.py):
    python sft.py                                         # CPU, preset tiny
    python sft.py --device=cuda                           # one GPU
    torchrun --standalone --nproc_per_node=8 sft.py --preset=paper --data=DATA
    # two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        sft.py --preset=paper --data=DATA
Options are --key=value (python sft.py --help lists them): --model_type=qwen2_5_vl builds a tiny
Qwen2.5-VL instead, --base_model=Qwen/Qwen2.5-VL-7B-Instruct (or a local folder) starts from a real
model, --fsdp=true shards with FSDP2, --resume=true continues from out_dir/model. The paper preset
needs its --data on the command line (docs/data.md's specs, e.g. refcoco:...,grefcoco:...).
--encode_only=true runs the codes pass alone (every mask's two words, sharded over the ranks,
cached in out/codes for sft.py and grpo.py), e.g. once for a dataset before training:
    torchrun --standalone --nproc_per_node=8 sft.py --preset=paper --data=DATA --encode_only=true
Any --data on disk streams (data/stream.py: the workers tokenize and bucket the conversations);
the shapes world of the tiny preset is held in memory.
Writes out_dir/model (save_pretrained: model + processor + optimizer state), out_dir/metrics.json
and out_dir/gallery.png (test predictions over their images).
"""

import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tiny_vlm
from common import (UserError, adamw, autocast, cleanup, configure, init_distributed, is_master, lr_at, print0,
                    run, set_lr, stop_early, write_json)
from data.tasks import text_corpus
from samtok import codes_to_text, load_tokenizer, mask_tokens
from data.stream import open_stream, streamed
from vlm import (ConversationBatches, codes_table, collate, evaluate, load_pretrained, load_world, micro_batches, parallelize,
                 resume_dir, save_checkpoint, set_trainable, tokenizer_of, training_conversations, vision_tower, visual_tokens)

# ----------------------------------------------------------------------------- config
DEFAULTS = dict(
    out_dir="out/sft",
    device="auto",              # auto | cpu | cuda
    seed=0,
    # the VLM: a released checkpoint, or (empty) a small one built from the config classes
    base_model="",              # hub id or local folder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    model_type="qwen3_vl",      # config-built family: qwen3_vl | qwen2_5_vl
    hidden_size=192, n_layers=3, n_heads=3, n_kv_heads=1, intermediate_size=512, rope_theta=1e4,
    # 4 blocks: most misses are phrases that need the object's shape, which 2 blocks barely read;
    # the tower is frozen during SFT, so its depth costs only its pretraining, paid for with LM
    # steps (docs/LOG.md)
    vision_hidden=96, vision_depth=4, vision_heads=2, vision_intermediate=192,
    # 8 px patches, merged 2 x 2: 64 visual tokens of 16 px each, so a small object fills more of its
    # token; each step and the tower's pretraining take longer, paid for with fewer steps (docs/LOG.md)
    patch_size=8,
    init_std=0.02,              # config-built: initializer_range of the weights
    tie_embeddings=False,       # Qwen2.5-VL-3B ties the LM head to the input embeddings, 7B does not
    vocab_pad=64,               # config-built: embedding rows padded to a multiple (Qwen: 151,936)
    bpe_vocab=1000,             # BPE vocabulary (256 bytes + merges) learned on the world's text
    image_size=128,             # images resized to image_size^2 px: (128/8)^2 / 2^2 = 64 visual tokens;
                                # 0 (--base_model): the processor's native resolution, aspect ratio kept
    # Stage 1
    tokenizer_ckpt="out/tokenizer/ckpt.pt",
    # data: the synthetic shapes world by default, or any data.open_dataset spec (a jsonl folder,
    # coco:..., refcoco:..., grefcoco:..., sa1b:...; comma-joined for a mixture)
    data="shapes",
    n_train=3000,               # the first n scenes of the split; every scene gives ~13 samples over the tasks
    stream="auto",              # auto: the shapes world in memory, any --data on disk streamed (data/stream.py) | true | false
    num_workers=2, pool_scenes=64,   # streamed: reader processes a rank; conversations are bucketed in pools of these scenes
    built_scenes=500,           # streamed, config-built model: the first scenes its BPE and its tower's pretraining read
    tasks="refer,caption,gcg",
    extra_none=2,               # shapes world: this many more no-target phrases per training scene
    refer_repeat=2,             # referring samples dealt this many times an epoch (the other tasks once)
    turns=4,                    # turns (samples of one image and task) per training conversation; 1 = single-turn
    max_len=1024,               # longer conversations are dropped (and counted), never truncated
    # optimisation
    steps=3600, batch_size=10, grad_accum=1,   # conversations per micro-batch per process
    # a 3-layer LM from scratch: at 2e-3 its steps are too large for its blocks, which then fit
    # even their training scenes' mask words worse; at 5e-4 it finds the object more often (docs/LOG.md)
    lr=5e-4, min_lr_ratio=0.1, warmup_frac=0.05, weight_decay=0.01, beta2=0.95, grad_clip=1.0,
    freeze_vision=False,        # paper: vision tower frozen, projector (merger) + LLM trained
    # config-built model only: a short dense pretraining of the random vision tower
    # (tiny_vlm.pretrain_vision), after which the tower, merger included, stays frozen during SFT;
    # it underfits its targets, so it gets many small batches rather than few large ones
    vision_pretrain_steps=2000, vision_pretrain_batch=16, vision_pretrain_lr=4e-3,
    word_soft=0.5,              # this much of each code word's target spread over nearby codes (word_targets); 0: the paper's plain loss
    word_init="codebook",       # new mask-word rows: "mean" (the paper's rule) | "codebook" (config-built model)
    fsdp=False,                 # FSDP2 (fully_shard) instead of DDP
    grad_checkpointing=False,
    bucket_pool=64,             # length bucketing: sort pools of bucket_pool micro-batches by length
    # bookkeeping
    log_every=50, ckpt_every=500, resume=False,
    stop_after=0,               # stop after this many steps of this run (simulates an interruption)
    eval_n=100,                 # test scenes for the final evaluation (0: none)
    encode_only=False,          # only the codes pass: encode the train and test masks into the cache, then stop
    eval_batch=64,
    peak_tflops=989.0,          # the GPU's dense bf16 peak (H100: 989), for the MFU in the step line
)
PRESETS = {
    "tiny": {},
    # global batch 256 = batch_size 4 x grad_accum 8 x 8 GPUs; AdamW lr 2e-5, cosine, bf16
    "paper": dict(base_model="Qwen/Qwen2.5-VL-3B-Instruct", image_size=0, freeze_vision=True, fsdp=True, word_init="mean",
                  grad_checkpointing=True, word_soft=0.0, refer_repeat=1, n_train=200_000, steps=20_000, batch_size=4, grad_accum=8,
                  lr=2e-5, min_lr_ratio=0.0, warmup_frac=0.03, weight_decay=0.0, beta2=0.999,
                  max_len=2048, log_every=10, ckpt_every=1000, eval_n=500, eval_batch=32, num_workers=6, pool_scenes=256),
}
PAPER_NEEDS = {"paper": dict(data="the data to train on, e.g. --data='refcoco:...,grefcoco:...' (--data=shapes: the toy world)")}
TASKS = ("refer", "caption", "gcg", "ground")


# ----------------------------------------------------------------------------- vocabulary surgery
def add_mask_tokens(model, processor):
    """Vocabulary surgery (PAPER.md section 2): the 514 mask words become ordinary tokens
    (non-special, unnormalized, no strip), the embedding matrix grows to hold them, and every new
    row - input embedding and LM head, tied or not - starts at mean + 0.02 * N(0, 1) * std of the
    old real rows, per dimension. Returns the words' ids. Idempotent: words already in the
    vocabulary (a resumed or reloaded model) keep their trained rows."""
    from transformers import AddedToken
    text_tok = processor.tokenizer
    words = mask_tokens()
    old_len = len(text_tok)
    text_tok.add_tokens([AddedToken(w, special=False, normalized=False, lstrip=False, rstrip=False) for w in words])
    ids = text_tok.convert_tokens_to_ids(words)
    new = [i for i in ids if i >= old_len]
    # Pitfall: Qwen-VL matrices are padded (3B: 151,936 rows for 151,665 tokens), so
    # resize_token_embeddings(len(tokenizer)) can SHRINK them. Never shrink: grow only if needed.
    rows = model.get_input_embeddings().weight.shape[0]
    if len(text_tok) > rows:
        model.resize_token_embeddings(len(text_tok), mean_resizing=False)
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
        if text_tok.encode(w, add_special_tokens=False) != [i] or text_tok.decode([i]) != w:
            raise RuntimeError(f"mask word {w} does not round-trip through the tokenizer (id {i})")
    sample = "a" + codes_to_text([[3, 7], [255, 0]]) + " b"
    if text_tok.decode(text_tok.encode(sample, add_special_tokens=False)) != sample:
        raise RuntimeError("mask words inside text do not round-trip through the tokenizer")
    return ids


# ----------------------------------------------------------------------------- the loss
def word_targets(codebook, alpha):
    """(levels * K, levels * K) target distributions over the code words, from the codebooks
    (levels, K, D): (1 - alpha) on the word itself, alpha spread over its own level's words by
    softmax(-|c_k - c_word|^2 / tau), tau the median squared distance of a code to its nearest
    neighbour. The decoder paints nearly the same mask from a nearby code, so a nearby word is a
    smaller mistake than a far one."""
    def level(c):
        d2 = torch.cdist(c, c).pow(2)
        tau = d2.fill_diagonal_(float("inf")).min(1).values.median()
        return alpha * (-d2.fill_diagonal_(0) / tau).softmax(1) + (1 - alpha) * torch.eye(len(c))
    return torch.block_diag(*[level(c) for c in codebook.float().cpu()])


def token_loss(model, batch, labels, word_ids, soft=None):
    """Summed next-token cross-entropy over the labelled (assistant) tokens: position t predicts
    token t+1. Summed, not averaged, so micro-batches and ranks can be weighted by tokens. Also
    counts the teacher-forced argmax hits on the code words <|mt_0000|>..<|mt_0511|>: the key
    learnable quantity of this stage, the VLM reading the tokenizer's codes off image + phrase."""
    target = labels[:, 1:]                                     # (B, L-1), -100 = no loss
    keep = F.pad(target != -100, (0, 1))                       # (B, L): positions whose next token is labelled
    # The LM head runs on those positions only (transformers' logits_to_keep takes a boolean
    # mask): the prompt's logits are never used, and the whole (B, L, V) in fp32 would be ~12 GB
    # at 7B.
    logits = model(**batch, use_cache=False, logits_to_keep=keep).logits.float()   # (kept, V)
    target = target[keep[:, :-1]]
    is_word = torch.isin(target, word_ids)
    if soft is None:
        loss = F.cross_entropy(logits, target, reduction="sum")
    else:                       # the code words against word_targets' distributions
        loss = F.cross_entropy(logits[~is_word], target[~is_word], reduction="sum")
        w = torch.searchsorted(word_ids, target[is_word])                        # word_ids ascend
        loss = loss - (soft[w] * logits[is_word].log_softmax(-1)[:, word_ids]).sum()
    with torch.no_grad():
        hits = (logits.argmax(-1) == target)[is_word].sum()
    return loss, torch.stack([hits, is_word.sum()]).float()


# ----------------------------------------------------------------------------- the phases of main
def check_options(cfg):
    """Options that cannot work, as one line each, before anything is loaded or written."""
    tasks = cfg["tasks"].split(",")
    if not tasks or not set(tasks) <= set(TASKS):
        raise UserError(f"--tasks takes a comma list of {', '.join(TASKS)}; got {cfg['tasks']!r}")
    if not cfg["image_size"] and not cfg["base_model"]:
        raise UserError("--image_size=0 (native resolution) is for a released Qwen-VL (--base_model); a config-built "
                        "model reads a fixed square: pass --image_size=128")
    if not 0 <= cfg["word_soft"] <= 1:
        raise UserError(f"--word_soft is the share of a code word's target given to nearby codes, from 0 to 1; "
                        f"got {cfg['word_soft']}")
    if cfg["refer_repeat"] < 1:
        raise UserError(f"--refer_repeat is how many times an epoch deals each referring sample, 1 or more; "
                        f"got {cfg['refer_repeat']}")
    if cfg["word_init"] not in ("mean", "codebook"):
        raise UserError(f"--word_init takes mean or codebook, got {cfg['word_init']!r}")
    return tasks


def setup(cfg, mask_tok, tasks, model_dir):
    """Everything training starts from, in a fixed order after the seed (bench.py calls it too, so
    its peer trains the very same weights on the very same conversations): the train split's
    samples with their mask words, the VLM and its processor (resumed from model_dir, a released
    base model, or built from the config), the vocabulary surgery, and the tokenized
    conversations. Returns model, processor, images, conversations, the 512 code words' ids,
    the resumed train state (or None), how many conversations max_len dropped, the codes table.
    Streamed (data.stream.streamed), only the codes pass runs here over the whole split (images
    and conversations are None: the workers make them as they go), and a config-built model's
    BPE and tower pretraining read the first built_scenes scenes alone."""
    built, stream = not cfg["resume"] and not cfg["base_model"], streamed(cfg)
    # every rank encodes its share of the masks (vlm.codes_table), or all read them from the cache
    table = codes_table(mask_tok, cfg, "train", cfg["n_train"])
    images, samples, scenes, codes = (None, None, None, None) if stream and not built else load_world(
        "train", cfg["built_scenes"] if stream else cfg["n_train"], mask_tok, cfg, tasks, cfg["extra_none"],
        keep_masks=built and cfg["vision_pretrain_steps"] > 0, table=table)
    state = None
    if cfg["resume"]:
        src, state = resume_dir(model_dir)
        model, processor = load_pretrained(src, cfg)
    elif cfg["base_model"]:
        model, processor = load_pretrained(cfg["base_model"], cfg)
    else:
        processor = tiny_vlm.build_processor(cfg, text_corpus([s for _, s in scenes[:500]], tasks))
        model = tiny_vlm.build_model(cfg, processor)
    word_ids = torch.tensor(add_mask_tokens(model, processor)[1:-1])       # the 512 code words
    if built:
        # every rank runs the same seeded steps on the same data: identical weights, no broadcast
        codebook = mask_tok.rvq.codebook.detach().cpu().float()
        if cfg["word_init"] == "codebook":
            tiny_vlm.init_words_from_codebook(model, word_ids, codebook)
        if cfg["vision_pretrain_steps"]:
            tiny_vlm.pretrain_vision(model, processor, images, scenes, codes, codebook, cfg, log=print0)
    if stream:
        print0(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"vocabulary {len(processor.tokenizer)} | data: {len(table['keys'])} train scenes, streamed")
        return model, processor, None, None, word_ids, state, 0, table
    convs, dropped = training_conversations(samples, images, processor, cfg, cfg["seed"])
    count = {t: sum(x["task"] == t for c in convs for x in c["turns"]) for t in tasks}
    print0(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
           f"vocabulary {len(processor.tokenizer)} | data: {len(images)} train scenes -> {len(convs)} conversations "
           f"of {count}, {dropped} dropped as longer than max_len={cfg['max_len']}")
    if not convs:
        raise UserError("no training samples left (is max_len too small?)")
    return model, processor, images, convs, word_ids, state, dropped, table


def prepare_training(model, processor, images, convs, cfg, rank, world, device, state, table, tasks):
    """What trains (the paper: the projector + LLM; the tiny preset's pretrained tower stays
    frozen, merger included), the frozen tower's tokens computed once (in memory), DDP / FSDP2,
    AdamW (its state restored on resume), and draw(): this rank's micro-batches of the next step,
    length-bucketed, positioned after what a resumed run already trained on: from the
    conversations in memory, or streamed (ConversationBatches in data.stream's workers).
    -> (net, opt, params, draw, the stream's Position or None)."""
    cfg["tower_frozen"] = not cfg["base_model"] and cfg["vision_pretrain_steps"] > 0
    set_trainable(model, cfg)
    if cfg["grad_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(device)
    # a frozen tower (merger included) gives a fixed function of the image: run it once, not every step
    visual = None if convs is None or any(p.requires_grad for p in vision_tower(model).parameters()) else \
        visual_tokens(model, processor, images, device)
    net = parallelize(model, cfg, world, device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = adamw(params, cfg["lr"], cfg["weight_decay"], cfg["beta2"])
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    step, accum = state["step"] if state else 0, cfg["grad_accum"]
    print0(f"global batch: {cfg['batch_size'] * accum * world} conversations a step"
           + (f"; resuming from step {step}" if step else ""))
    if convs is None:               # streamed: each rank reads its own shards
        draw, position = open_stream(cfg, ConversationBatches(table, processor, cfg, tasks), cfg["pool_scenes"],
                                     state.get("stream") if state else None, device, rank, world)
        return net, opt, params, lambda: [draw() for _ in range(accum)], position
    # in memory: every rank walks the same stream of micro-batches and takes its share (micro-batch
    # j of a step goes to rank j % world), so a step's global batch is the same set of conversations
    # on 1 process with grad_accum=a*N as on N processes with a each
    stream = micro_batches([len(c["ids"]) for c in convs], cfg["batch_size"], cfg["seed"], cfg["bucket_pool"],
                           skip=step * accum * world)

    def draw():
        mbs = [[convs[j] for j in next(stream)] for _ in range(accum * world)][rank::world]
        return [dict(zip(("batch", "labels"), collate(mb, images, processor, visual=visual)),
                     n_tok=sum(sum(c["in_loss"]) for c in mb), dropped=0) for mb in mbs]
    return net, opt, params, draw, None


def encode_only(cfg, mask_tok, tasks):
    """--encode_only=true: the codes pass alone, so a dataset is encoded once before any training
    (sharded over torchrun's ranks, on their devices): the masks of the n_train train scenes and
    of the eval_n test scenes, into the cache that sft.py and grpo.py read (vlm.codes_table)."""
    codes_table(mask_tok, cfg, "train", cfg["n_train"])
    if cfg["eval_n"]:
        codes_table(mask_tok, cfg, "test", cfg["eval_n"])
    cleanup()


def final_evaluation(cfg, mask_tok, device, padding, dropped, train_seconds):
    """The model as saved (it checks the saved format too), loaded fresh as grpo.py or any user
    would, scored on the test split on rank 0; writes metrics.json and gallery.png."""
    out, model_dir = cfg["out_dir"], os.path.join(cfg["out_dir"], "model")
    if not is_master() or not cfg["eval_n"]:
        return print0(f"done in {train_seconds:.0f} s; padding {padding:.1%}")
    model, processor = load_pretrained(model_dir, cfg)
    with autocast(device):
        m = evaluate(model.to(device), processor, mask_tok, cfg, n=cfg["eval_n"], gallery=os.path.join(out, "gallery.png"))
    m.update(refer_miou_over_ceiling=m["refer_miou"] / max(m["tokenizer_ceiling_miou"], 1e-9), padding_fraction=padding,
             train_seconds=train_seconds, dropped_too_long=dropped, steps=cfg["steps"],
             n_params=sum(p.numel() for p in model.parameters()), preset=cfg["preset"])
    write_json(os.path.join(out, "metrics.json"), m)
    f = lambda x: "-" if x is None else f"{x:.3f}"       # a dataset without no-target prompts or captions
    print(f"test: referring mIoU {m['refer_miou']:.4f} (tokenizer ceiling {m['tokenizer_ceiling_miou']:.4f}, ratio "
          f"{m['refer_miou_over_ceiling']:.2f}) | cIoU {m['refer_ciou']:.4f} | N-acc {f(m['nacc'])} | exact mask words "
          f"{f(m['exact_match'])} | caption attributes {f(m['caption_attr_acc'])} | right object {f(m['refer_right_object'])} "
          f"(tiny {f(m['refer_right_object_tiny'])}, big {f(m['refer_right_object_big'])}) | level-1 word "
          f"{f(m['refer_level1_exact'])}")
    print(f"padding {padding:.1%} | trained in {train_seconds:.0f} s | wrote {model_dir}, {out}/metrics.json, {out}/gallery.png")


# ----------------------------------------------------------------------------- main
def main():
    cfg = dict(configure(DEFAULTS, PRESETS, doc=__doc__, required=PAPER_NEEDS), stage="sft")
    tasks = check_options(cfg)
    rank, world, device = init_distributed(cfg["device"])
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank (FSDP does not broadcast)
    print0("config:", cfg)
    t_start, model_dir = time.time(), os.path.join(cfg["out_dir"], "model")
    mask_tok = load_tokenizer(tokenizer_of(cfg, cfg["base_model"], DEFAULTS["tokenizer_ckpt"]), device)  # mask -> words
    if cfg["encode_only"]:          # the codes pass alone: the words of every train and test mask, cached
        return encode_only(cfg, mask_tok, tasks)
    model, processor, images, convs, word_ids, state, dropped, table = setup(cfg, mask_tok, tasks, model_dir)
    net, opt, params, draw, position = prepare_training(model, processor, images, convs, cfg, rank, world, device, state,
                                                        table, tasks)

    # ---- the loop: each step, this rank's grad_accum micro-batches of the global batch (draw)
    accum, steps, step = cfg["grad_accum"], cfg["steps"], state["step"] if state else 0
    n_params, word_ids, amp = sum(p.numel() for p in model.parameters()), word_ids.to(device), autocast(device)
    soft = word_targets(mask_tok.rvq.codebook, cfg["word_soft"]).to(device) if cfg["word_soft"] else None
    pad = torch.zeros(2, dtype=torch.float64, device=device)            # padding tokens, all tokens
    t0, run_steps, tokens_window, loss_window, word_window = time.time(), 0, 0, [], torch.zeros(2)
    net.train()
    while step < steps:
        # determine and set the learning rate for this step
        lr = set_lr(opt, lr_at(step, steps, cfg["lr"], cfg["warmup_frac"], cfg["min_lr_ratio"]))
        # forward backward update, with gradient accumulation over this rank's micro-batches. The
        # loss of a step is the mean over every assistant token of the GLOBAL batch: each rank knows
        # the ranks sum their counts; DDP / FSDP average gradients over ranks, hence the factor
        # world below.
        group = draw()
        n_tok = torch.tensor(float(sum(b["n_tok"] for b in group)), device=device)
        if world > 1:
            dist.all_reduce(n_tok)
        dropped += sum(b["dropped"] for b in group)
        totals = torch.zeros(3, device=device)            # summed loss, mask-word hits, mask words
        for micro, b in enumerate(group):
            batch, labels = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b["batch"].items()}, b["labels"]
            pad += torch.tensor([(batch["attention_mask"] == 0).sum(), batch["attention_mask"].numel()], device=device)
            tokens_window += int(batch["attention_mask"].sum())
            # DDP all-reduces gradients on the last micro-batch only. FSDP2 reduce-scatters every
            # micro-batch: skipping it would keep full unsharded fp32 gradient sums on every rank.
            if isinstance(net, torch.nn.parallel.DistributedDataParallel):
                net.require_backward_grad_sync = micro == accum - 1
            with amp:
                loss, hits = token_loss(net, batch, labels.to(device), word_ids, soft)
            (loss * world / n_tok).backward()
            totals += torch.cat([loss.detach()[None], hits])
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])   # FSDP: over the sharded grads, globally
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, run_steps = step + 1, run_steps + 1
        # timing and logging: loss, mask-word accuracy, ms/step, tokens/s (MFU on GPU)
        if world > 1:
            dist.all_reduce(totals)
        loss_window.append(totals[0].item() / n_tok.item())
        word_window += totals[1:].cpu()
        if step % cfg["log_every"] == 0 or step == steps or step == 1:
            dt, tok_s = (time.time() - t0) / run_steps, tokens_window * world / (time.time() - t0)
            # MFU: ~6 FLOPs per parameter per token (forward + backward) against the GPUs' peak
            mfu = f" | MFU {6 * n_params * tok_s / (world * cfg['peak_tflops'] * 1e12):.1%}" if device.type == "cuda" else ""
            print0(f"step {step:5d}/{steps} | loss {np.mean(loss_window):.4f} | mask-word acc "
                   f"{word_window[0] / word_window[1].clamp(min=1):.3f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step "
                   f"| {tok_s:.0f} tok/s{mfu}")
            loss_window, word_window = [], torch.zeros(2)
        # checkpoint and termination conditions
        if step % cfg["ckpt_every"] == 0 or step == steps:
            save_checkpoint(net, opt, processor, cfg, step, model_dir, stream=position.gathered() if position else None)
        if stop_early(cfg, run_steps, step, steps):
            return
    if world > 1:
        dist.all_reduce(pad)
    cleanup()

    # ---- evaluation, on rank 0, of the model as saved
    final_evaluation(cfg, mask_tok, device, float(pad[0] / pad[1].clamp(min=1)), dropped, time.time() - t_start)


if __name__ == "__main__":
    run(main)
