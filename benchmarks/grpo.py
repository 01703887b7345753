"""
grpo.py against TRL's GRPOTrainer: completions/s and step time of Stage 3, G sampled answers a
prompt scored by the textual answer-matching reward, group-relative advantages, the clipped
policy loss.

Kept identical: grpo.py runs in its own process exactly as a user runs it; TRL runs in this
process from the same start policy (Stage 2's model, loaded by grpo.load_start after the same
seed), on the same prompts in grpo.py's order (TRL's shuffling off; the first prompt's ids are
checked equal), with the same G, completions a step, micro-batches, max new tokens and
temperature, the same loss (grpo aggregation, the same clip range and beta), the same AdamW and
warmup + cosine schedule, and the paper's reward (grpo.reward_match on TRL's decoded text). The
first grpo_warmup steps of each side are not timed. Both sides train the same parameters: what
Stage 2 kept frozen (the tiny preset's whole vision tower, from its stage_config.json) stays
frozen in the model handed to the Trainer too (vlm.set_trainable).
"""

import os
import re
import warnings

import numpy as np
import torch

import grpo
from bench import peer_missing, run_script, stage_args, step_clock, table, timed_steps
from common import UserError, adamw, configure, lr_at, read_json
from vlm import micro_batches, resolve_init, set_trainable

GRPO_LINE = re.compile(r"step\s+(\d+)/\d+ \| reward ([\d.]+) .*?\| len ([\d.]+) .*?\| (\d+) ms/step "
                       r"\((\d+)% sampling\) \| (\d+) completions/s")


def run_trl_grpo(cfg, device, steps):
    """TRL's GRPOTrainer on grpo.py's start policy and prompts, in grpo.py's order. -> step
    seconds, completion lengths, rewards, and whether the first prompt's ids are grpo.py's."""
    from datasets import Dataset
    from PIL import Image
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer
    torch.manual_seed(cfg["seed"])
    _, _, (images, prompts, _), model, processor, _ = grpo.load_start(cfg, device)
    set_trainable(model, cfg)            # what grpo.py trains, and nothing else
    G = cfg["num_generations"]
    # grpo.py's prompt stream: batch_size / G prompts a step, length-bucketed in pools of 16
    stream = micro_batches([len(p["ids"]) for p in prompts], cfg["batch_size"] // G, cfg["seed"], 16)
    order = [j for _ in range(steps) for j in next(stream)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": prompts[j]["prompt"]}],
                             "image": Image.fromarray(images[prompts[j]["img"]]), "answer": prompts[j]["answer"]}
                            for j in order])

    def reward(completions, answer, **kw):
        return [grpo.reward_match(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    # grpo.py's AdamW, and its warmup + cosine as a multiplier of lr (HF's own warmup starts at lr 0)
    opt = adamw(model.parameters(), cfg["lr"], cfg["weight_decay"], cfg["beta2"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, 1.0, cfg["warmup_frac"], cfg["min_lr_ratio"]))
    # grpo.py's settings in TRL's names: a device batch counts completions, epsilon / epsilon_high are
    # the clip range [1 - eps_low, 1 + eps_high], beta the weight of the KL to the start model
    with warnings.catch_warnings():      # transformers' deprecation notes about TRL's own defaults
        warnings.simplefilter("ignore", FutureWarning)
        args = GRPOConfig(
            output_dir=os.path.join(cfg["out_dir"], "trl"), max_steps=steps, per_device_train_batch_size=cfg["micro_batch"],
            gradient_accumulation_steps=cfg["batch_size"] // cfg["micro_batch"], num_generations=G,
            max_completion_length=cfg["max_new_tokens"], temperature=cfg["temperature"], top_p=1.0, top_k=0,
            beta=cfg["beta"], epsilon=cfg["eps_low"], epsilon_high=cfg["eps_high"], loss_type=cfg["loss_type"],
            scale_rewards=cfg["scale_rewards"], num_iterations=cfg["num_iterations"], max_grad_norm=cfg["grad_clip"],
            shuffle_dataset=False, gradient_checkpointing=cfg["grad_checkpointing"], bf16=device.type == "cuda",
            use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none", seed=cfg["seed"],
            disable_tqdm=True, log_level="warning")

    clock = step_clock(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(model=model.to(device), reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=processor, callbacks=[clock], optimizers=(opt, sched))
    trainer.remove_callback(PrinterCallback)
    # the first prompt as TRL renders it against grpo.py's ids
    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                              "text": prompts[order[0]]["prompt"]}]}], add_generation_prompt=True,
                                             tokenize=False)
    same_prompt = processor(images=[images[prompts[order[0]]["img"]]], text=[rendered])["input_ids"][0] \
        == prompts[order[0]]["ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    logs = [x for x in clock.logs if "reward" in x]
    lengths = [float(x.get("completions/mean_length", float("nan"))) for x in logs]
    rewards = [float(x["reward"]) for x in logs]
    return dict(step_seconds=clock.seconds, lengths=lengths, rewards=rewards, same_prompt=same_prompt)


def grpo_py(args, gcfg, N, w):
    """grpo.py run as a user runs it -> (its step lines, the timed ones, their seconds, completions/s,
    the share of each part of a step: sampling, reward, reference, policy forward, backward, optimizer)."""
    out = run_script("grpo.py", args)
    lines = {int(m[1]): dict(reward=float(m[2]), length=float(m[3]), ms=int(m[4]), sampling=int(m[5]) / 100,
                             comp_s=int(m[6])) for m in GRPO_LINE.finditer(out)}
    if set(lines) != set(range(1, N + 1)):
        raise RuntimeError(f"could not read grpo.py's step lines (got steps {sorted(lines)[:5]}...)")
    # each step line holds that step's own ms and sampling share: sum the timed ones
    timed = [lines[s] for s in range(w + 1, N + 1)]
    seconds = sum(x["ms"] for x in timed) / 1e3
    profile = read_json(os.path.join(gcfg["out_dir"], "metrics.json")).get("profile", {})
    return lines, timed, seconds, gcfg["batch_size"] * len(timed) / seconds, profile


def measure(cfg, device):
    """Completions/s and ms/step of each side over the steps after the warm-up, completion
    lengths, grpo.py's sampling share, the mean reward."""
    N, w = timed_steps(cfg, "grpo")
    skipped = peer_missing("trl", "grpo", ("grpo_speed_ratio",))
    if skipped:
        return skipped
    args = stage_args(cfg, "grpo", N, device)
    gcfg = configure(grpo.DEFAULTS, grpo.PRESETS, args)
    grpo.check_options(gcfg, 1)
    # TRL gets grpo.reward_match alone: the comparison holds for the paper's reward on the shapes world
    if gcfg["reward"] != "match" or gcfg["format_weight"] or gcfg["data"] != "shapes":
        raise UserError("the grpo section compares the paper's reward (--reward=match, no format term) on the synthetic world")
    try:
        resolve_init(gcfg["init_from"])
    except UserError as e:
        raise UserError(f"grpo section: {e}")
    # ---- grpo.py, its own process, with the shared prefix (the default) and without it: per-step
    # lines (log_every=1) give each step's figures, metrics.json where its time went
    runs = {share: grpo_py(args + [f"--share_prefix={share}"], gcfg, N, w) for share in (True, False)}
    lines, timed, ours_s, ours_comp_s, profile = runs[True]
    print(table(["where a grpo.py step's time goes", "shared prefix", "unshared"],
                [[k, f"{runs[True][4].get(k, 0):.0%}", f"{runs[False][4].get(k, 0):.0%}"] for k in runs[False][4]]
                + [["ms / step", runs[True][2] / len(timed) * 1e3, runs[False][2] / len(timed) * 1e3]]))
    # ---- TRL, this process
    trl = run_trl_grpo(gcfg, device, N)
    trl_s = sum(trl["step_seconds"][w:])                 # the same steps after the same warm-up
    trl_comp_s = gcfg["batch_size"] * (N - w) / trl_s
    mean = lambda v: float(np.mean(v)) if len(v) else None
    rows = [["grpo.py", ours_s / len(timed) * 1e3, ours_comp_s, mean([x["length"] for x in timed]),
             mean([x["sampling"] for x in timed]), mean([x["reward"] for x in lines.values()])],
            ["TRL GRPOTrainer", trl_s / (N - w) * 1e3, trl_comp_s, mean(trl["lengths"][w:]), None, mean(trl["rewards"])]]
    print(table(["trainer", "ms / step", "completions / s", "completion tokens (mean)", "sampling share",
                 "mean reward"], rows))
    print(f"{gcfg['batch_size']} completions a step ({gcfg['batch_size'] // gcfg['num_generations']} prompts x "
          f"G={gcfg['num_generations']}), at most {gcfg['max_new_tokens']} new tokens, micro-batches of "
          f"{gcfg['micro_batch']}; {N - w} steps timed after {w}; same prompt ids: {trl['same_prompt']}; "
          f"policy {gcfg['init_from']}; device {device.type}")
    return {"grpo_speed_ratio": ours_comp_s / trl_comp_s,
            "grpo": dict(steps=N, warmup=w, completions_per_step=gcfg["batch_size"], G=gcfg["num_generations"],
                         unshared_completions_s=runs[False][3], unshared_ms_step=runs[False][2] / len(timed) * 1e3,
                         profile_shared=runs[True][4], profile_unshared=runs[False][4], beta=gcfg["beta"],
                         max_new_tokens=gcfg["max_new_tokens"], ours_completions_s=ours_comp_s,
                         trl_completions_s=trl_comp_s, ours_ms_step=ours_s / len(timed) * 1e3,
                         trl_ms_step=trl_s / (N - w) * 1e3, ours_mean_length=rows[0][3], trl_mean_length=rows[1][3],
                         ours_sampling_share=rows[0][4], same_prompt=trl["same_prompt"], grpo_args=cfg["grpo_args"])}
