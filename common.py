"""
The few helpers every stage needs, in one place: the --key=value configurator, distributed
init, the warmup + cosine schedule, atomic writes, and the one-line error exit for bad input.
"""

import ast
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def configure(defaults, presets, argv=None):
    """nanoGPT-style configuration: module defaults, then a preset (plain dict of overrides,
    --preset=tiny by default), then --key=value overrides typed like the default they replace.
    Returns a new dict; an unknown key or a value of the wrong type is a one-line error."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = dict(defaults)
    args = {}
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise UserError(f"arguments look like --key=value, got {a!r}")
        k, v = a[2:].split("=", 1)
        args[k] = v
    preset = args.pop("preset", "tiny")
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    cfg.update(presets[preset])
    cfg["preset"] = preset
    for k, v in args.items():
        if k not in cfg:
            raise UserError(f"unknown option --{k}; options are: {', '.join(sorted(cfg))}")
        cfg[k] = parse_value(k, v, cfg[k])
    return cfg


def parse_value(key, text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key} takes true or false, got {text!r}")
    if isinstance(default, str) or default is None:
        return None if text.lower() == "none" else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--{key}={text!r} is not a {type(default).__name__}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(default)(value)
    if type(value) is not type(default):
        raise UserError(f"--{key} takes a {type(default).__name__}, got {text!r}")
    return value


def init_distributed(device_pref="auto"):
    """One process or N under torchrun: returns (rank, world_size, device). DDP runs when
    torchrun set RANK; NCCL on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def lr_at(step, total, base, warmup_frac=0.05, min_ratio=0.1):
    """Linear warmup over warmup_frac of the steps, then cosine down to min_ratio * base."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write never leaves a half checkpoint
    where a good one was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)])


def overlay(image, masks, alpha=0.55):
    """Coloured masks over an RGB image (H, W, 3) uint8 -> uint8; mask i gets PALETTE[i]."""
    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * PALETTE[i % len(PALETTE)]
    return out.astype(np.uint8)


def stop_early(cfg, run_steps, step, steps, master):
    """--stop_after: end this run after so many of its steps (what an interruption leaves: the
    last checkpoint, which --resume=true continues). True when the caller should return."""
    if not cfg["stop_after"] or run_steps < cfg["stop_after"] or step >= steps:
        return False
    if master:
        print(f"stopping after {run_steps} steps (--stop_after); continue with --resume=true")
    if dist.is_initialized():
        dist.destroy_process_group()
    return True
