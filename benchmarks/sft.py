"""
sft.py against TRL's SFTTrainer: training tokens/s and the loss after N steps of Stage 2's
next-token cross-entropy on the assistant's tokens.

Kept identical: sft.py runs in its own process exactly as a user runs it; TRL runs in this process
on the very same start weights (the seed, then the Stage-1 tokenizer, then sft.setup: sft.py's own
order, so the config-built VLM draws the same initial weights), the same conversations and the same
micro-batches in sft.py's order (TRL's shuffling replaced), the same steps, and sft.py's AdamW and
warmup + cosine schedule handed to the Trainer. A chat template with TRL's {% generation %} markers
makes its collator produce exactly sft.py's token ids, pixels and loss positions (checked on the
first micro-batch). TRL's step time runs from the end of one step to the end of the next, data
loading included, as sft.py's step line counts it. Runs alternate (ours, TRL, TRL, ours, ...) and
the median of each side counts; the first sft_warmup steps of each run are not timed.
"""

import os
import re
import warnings

import numpy as np
import torch

import sft
import tiny_vlm
from bench import peer_missing, run_script, stage_args, step_clock, table, timed_steps
from common import UserError, adamw, configure, lr_at
from samtok import load_tokenizer
from vlm import collate, micro_batches, set_trainable

STEP_LINE = re.compile(r"step\s+(\d+)/\d+ \| loss ([\d.]+) .*?\| (\d+) ms/step \| (\d+) tok/s")


def sft_stream(cfg, convs, n_steps):
    """The micro-batches of sft.py's first n_steps steps, in its order (one process)."""
    stream = micro_batches([len(c["ids"]) for c in convs], cfg["batch_size"], cfg["seed"], cfg["bucket_pool"])
    return [[next(stream) for _ in range(cfg["grad_accum"])] for _ in range(n_steps)]


def trl_rows(convs, images):
    """sft.py's conversations as TRL's conversational vision rows: the image once, before the
    first user text; the assistant turns are what the loss covers (assistant_only_loss)."""
    from PIL import Image
    rows = []
    for c in convs:
        msgs = []
        for turn in c["turns"]:
            msgs += [{"role": "user", "content": turn["prompt"]}, {"role": "assistant", "content": turn["answer"]}]
        rows.append({"images": [Image.fromarray(images[c["img"]])], "messages": msgs})
    return rows


def training_template():
    """tiny_vlm.CHAT_TEMPLATE with TRL's {% generation %} markers around each assistant reply and
    its <|im_end|>: what assistant_only_loss needs to label exactly the tokens sft.py labels. The
    newline after <|im_end|> is written as an expression (transformers renders templates with
    trim_blocks, which would eat a literal newline after a block tag), and not after the last
    turn: sft.py's sequences end at the last reply's <|im_end|>."""
    body = ("{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>")
    if body + "\n" not in tiny_vlm.CHAT_TEMPLATE:
        raise RuntimeError("tiny_vlm.CHAT_TEMPLATE changed: update benchmarks/sft.py: training_template")
    marked = ("{% if message['role'] == 'assistant' %}{% generation %}" + body + "{% endgeneration %}"
              "{% else %}" + body + "{% endif %}{% if not loop.last %}{{ '\\n' }}{% endif %}")
    return tiny_vlm.CHAT_TEMPLATE.replace(body + "\n", marked)


def run_trl_sft(cfg, model, processor, images, convs, steps, device):
    """TRL's SFTTrainer on the same model, rows and micro-batches (in sft.py's order), same
    optimiser settings. -> dict(step_seconds, losses, same_ids, same_labels)."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer
    plan = sft_stream(cfg, convs, steps)
    order = [j for step in plan for mb in step for j in mb]
    ds = Dataset.from_list(trl_rows([convs[j] for j in order], images))
    batches, i = [], 0
    for step in plan:
        for mb in step:
            batches.append(list(range(i, i + len(mb))))
            i += len(mb)
    processor.chat_template = training_template()
    # sft.py's optimiser and schedule, handed to the Trainer, so that both sides take the same
    # steps: AdamW without decay on 1-d parameters, warmup + cosine from common.lr_at (HF's own
    # warmup starts at lr 0, ours at lr / warmup steps)
    set_trainable(model, cfg)
    opt = adamw(model.parameters(), cfg["lr"], cfg["weight_decay"], cfg["beta2"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, steps, 1.0, cfg["warmup_frac"], cfg["min_lr_ratio"]))
    with warnings.catch_warnings():      # transformers' deprecation notes about TRL's own defaults
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(
            output_dir=os.path.join(cfg["out_dir"], "trl"), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
            gradient_accumulation_steps=cfg["grad_accum"], max_grad_norm=cfg["grad_clip"], assistant_only_loss=True,
            gradient_checkpointing=cfg["grad_checkpointing"], max_length=None, bf16=device.type == "cuda",
            use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none",
            dataloader_num_workers=0, seed=cfg["seed"], disable_tqdm=True, log_level="warning")

    class SameBatches(SFTTrainer):
        """sft.py's micro-batches, in its order (TRL would shuffle its own)."""
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=batches,
                                                       collate_fn=self.data_collator))

    clock = step_clock(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SameBatches(model=model, args=args, train_dataset=ds, processing_class=processor,
                              callbacks=[clock], optimizers=(opt, sched))
    trainer.remove_callback(PrinterCallback)   # its per-step dicts; our table says it
    # the first micro-batch through TRL's collator against vlm.collate: the same token ids and
    # pixels, and the loss on the same positions (both hold unshifted labels, -100 elsewhere)
    ours, labels = collate([convs[j] for j in plan[0][0]], images, processor)
    theirs = trainer.data_collator([ds[k] for k in batches[0]])
    same_ids = ours["input_ids"].shape == theirs["input_ids"].shape and bool((ours["input_ids"] == theirs["input_ids"]).all()) \
        and torch.equal(ours["pixel_values"], theirs["pixel_values"])
    same_labels = same_ids and bool((labels == theirs["labels"]).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    losses = [float(x["loss"]) for x in clock.logs if "loss" in x]
    return dict(step_seconds=clock.seconds, losses=losses, same_ids=same_ids, same_labels=same_labels)


def run_sft_py(args, N, w):
    """sft.py in its own process. Its step lines (log_every=1) give cumulative ms/step and tok/s
    since its loop began: the steps after the warm-up are the difference of the cumulative totals
    at steps N and w. -> tok/s, ms/step, loss by step."""
    out = run_script("sft.py", args)
    steps = {int(m[1]): (float(m[2]), int(m[3]), int(m[4])) for m in STEP_LINE.finditer(out)}
    if set(steps) != set(range(1, N + 1)):
        raise RuntimeError(f"could not read sft.py's step lines (got steps {sorted(steps)[:5]}...)")
    T = lambda s: steps[s][1] * s / 1e3          # seconds since the loop began, at step s
    tokens = steps[N][2] * T(N) - steps[w][2] * T(w)
    return dict(tok_s=tokens / (T(N) - T(w)), ms=(T(N) - T(w)) / (N - w) * 1e3, losses=[steps[s][0] for s in range(1, N + 1)])


def measure(cfg, device):
    """Median tokens/s and ms/step of each side over cfg["sft_repeats"] runs, and the loss at steps 1 and N."""
    N, w = timed_steps(cfg, "sft")
    skipped = peer_missing("trl", "sft", ("sft_speed_ratio",))
    if skipped:
        return skipped
    if not os.path.exists(cfg["tokenizer_ckpt"]):
        raise UserError(f"no tokenizer checkpoint at {cfg['tokenizer_ckpt']}: run `python tokenizer.py` first")
    args = stage_args(cfg, "sft", N, device)
    scfg = configure(sft.DEFAULTS, sft.PRESETS, args)
    tasks = sft.check_options(scfg)
    ours, trl = [], []
    # runs alternate ours, TRL, TRL, ours, ... so a change of the machine's load hits both alike
    for r in range(cfg["sft_repeats"]):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            if side == "ours":
                ours.append(run_sft_py(args, N, w))
                continue
            # TRL: this process, the same weights on the same conversations as the sft.py process
            # (sft.py's order after the seed: the tokenizer, then setup, which builds the VLM)
            torch.manual_seed(scfg["seed"])
            mask_tok = load_tokenizer(scfg["tokenizer_ckpt"])
            model, processor, images, convs, *_ = sft.setup(scfg, mask_tok, tasks, "")
            res = run_trl_sft(scfg, model.to(device), processor, images, convs, N, device)
            tokens = [sum(len(convs[j]["ids"]) for mb in step for j in mb) for step in sft_stream(scfg, convs, N)]
            t = sum(res["step_seconds"][w:])
            trl.append(dict(res, tok_s=sum(tokens[w:]) / t, ms=t / (N - w) * 1e3))
    med = lambda runs, k: float(np.median([x[k] for x in runs]))
    first = lambda v: v[0] if v else None
    last = lambda v: v[-1] if v else None
    rows = [["sft.py", med(ours, "ms"), med(ours, "tok_s"), first(ours[0]["losses"]), last(ours[0]["losses"])],
            ["TRL SFTTrainer", med(trl, "ms"), med(trl, "tok_s"), first(trl[0]["losses"]), last(trl[0]["losses"])]]
    print(table(["trainer", "ms / step", "tokens / s", "loss, step 1", f"loss, step {N}"], rows))
    print(f"same token ids and pixels in the first batch: {trl[0]['same_ids']}, same loss positions: "
          f"{trl[0]['same_labels']}; {N - w} steps timed after {w}, median of {cfg['sft_repeats']} runs a side; "
          f"{scfg['batch_size']} conversations a step; device {device.type}")
    return {"sft_speed_ratio": rows[0][2] / rows[1][2],
            "sft": dict(steps=N, warmup=w, repeats=cfg["sft_repeats"], batch_size=scfg["batch_size"],
                        ours_tok_s=rows[0][2], trl_tok_s=rows[1][2], ours_ms_step=rows[0][1], trl_ms_step=rows[1][1],
                        ours_tok_s_runs=[x["tok_s"] for x in ours], trl_tok_s_runs=[x["tok_s"] for x in trl],
                        ours_loss_first=rows[0][3], ours_loss_last=rows[0][4], trl_loss_first=rows[1][3],
                        trl_loss_last=rows[1][4], same_ids=trl[0]["same_ids"], same_labels=trl[0]["same_labels"],
                        sft_args=cfg["sft_args"])}
