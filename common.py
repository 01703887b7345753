"""
The few helpers every stage needs, each in one place: the --key=value configurator (with
--help), rank-0 printing and distributed setup, autocast, the warmup + cosine schedule and its
setter, AdamW's decay groups, checkpoint reading and atomic writes, progress bars, and the
one-line error exit for bad input.
"""

import ast
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- bad input
class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run(main):
    """Run a stage's main(): a UserError anywhere inside becomes one line on stderr and exit 2."""
    try:
        return main()
    except UserError as e:
        die(e)


# ----------------------------------------------------------------------------- configuration
def configure(defaults, presets, argv=None, doc=None, positional=False, required=None):
    """nanoGPT-style configuration: module defaults, then a preset (plain dict of overrides,
    --preset=tiny by default), then --key=value (or --key value) overrides typed like the default
    they replace. --help prints the options, their defaults and the presets, and exits 0.
    Returns a new dict; an unknown key or a value of the wrong type is a UserError. positional:
    arguments that are not options are allowed anywhere and returned too: (cfg, [arguments]).
    required: {preset: {key: what to pass}}, options a preset needs said on the command line (the
    paper preset's data and weights: their defaults are the toy world's, never what was meant)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults, presets, doc))
        sys.exit(0)
    args, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if positional and not a.startswith("--"):
            rest.append(a)
            continue
        if not a.startswith("--") or len(a) == 2:
            raise UserError(f"arguments look like --key=value or --key value, got {a!r} (see --help)")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i < len(argv) and not argv[i].startswith("--"):
            k, v = a[2:], argv[i]
            i += 1
        else:
            raise UserError(f"{a} needs a value: {a}=VALUE (see --help)")
        args[k] = v
    preset = args.pop("preset", "tiny")
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    cfg = dict(defaults)
    cfg.update(presets[preset])
    cfg["preset"] = preset
    for k, v in args.items():
        if k not in cfg:
            raise UserError(f"unknown option --{k}; options are: {', '.join(sorted(cfg))} (see --help)")
        cfg[k] = parse_value(k, v, cfg[k])
    for k, hint in (required or {}).get(preset, {}).items():
        if k not in args:
            raise UserError(f"--preset={preset} needs --{k}: {hint}")
    return (cfg, rest) if positional else cfg


def parse_value(key, text, default):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key} takes true or false, got {text!r}")
    if default is None or default == "":     # an optional path or name: the word none says there is none
        return None if text.lower() == "none" else text
    if isinstance(default, str):            # one word of a choice (--scale_rewards=none): kept as typed
        return text
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


def help_text(defaults, presets, doc=None):
    """The stage's docstring, then every option with its default and the comment beside it in
    the DEFAULTS source, then each preset's overrides."""
    notes = {}
    main = sys.modules.get("__main__")
    try:
        with open(getattr(main, "__file__", "") or "") as f:
            for line in f:   # `key=value,   # what it is` lines of DEFAULTS
                if (m := re.match(r"\s+(\w+)=.*?#\s*(.*)$", line)) and m.group(1) in defaults:
                    notes.setdefault(m.group(1), m.group(2).strip())
    except OSError:
        pass
    lines = [doc.strip(), ""] if doc else []
    lines.append("options (--key=value or --key value):")
    width = max(len(k) for k in defaults) + 2
    for k, v in defaults.items():
        lines.append(f"  --{k:<{width}} {v!r:<24} {notes.get(k, '')}".rstrip())
    lines.append("presets (--preset=NAME, before the options above; tiny is the default):")
    for name, over in presets.items():
        lines.append(f"  {name}: " + (", ".join(f"{k}={v!r}" for k, v in over.items()) or "the defaults"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- processes
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


def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    """print on rank 0 only (every rank runs the same code; one of them speaks)."""
    if is_master():
        print(*args, **kwargs)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device):
    """bf16 autocast on GPU (the paper trains in bf16); fp32 on CPU, where bf16 is no faster here."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def progress(iterable, desc, total=None):
    """A tqdm bar for long non-training work, on rank 0 and only when stderr is a terminal."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not (is_master() and sys.stderr.isatty()))


def stop_early(cfg, run_steps, step, steps):
    """--stop_after: end this run after so many of its steps (what an interruption leaves: the
    last checkpoint, which --resume=true continues). True when the caller should return."""
    if not cfg["stop_after"] or run_steps < cfg["stop_after"] or step >= steps:
        return False
    print0(f"stopping after {run_steps} steps (--stop_after); continue with --resume=true")
    cleanup()
    return True


# ----------------------------------------------------------------------------- optimisation
def lr_at(step, total, base, warmup_frac=0.05, min_ratio=0.1):
    """Linear warmup over warmup_frac of the steps, then cosine down to min_ratio * base."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def adamw(params, lr, weight_decay, beta2):
    """AdamW with the usual decay groups: matrices decay, norms and biases (1-d) do not."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, beta2))


# ----------------------------------------------------------------------------- files
def read_checkpoint(path):
    """torch.load with weights_only=True (tensors and plain containers only: a checkpoint cannot
    run code), or one line naming the file. Any exception is caught: a truncated zip, a text file
    and a pickle of foreign classes all fail in different ways inside torch.load."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})")


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write never leaves a half checkpoint
    where a good one was."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def gather(obj, world):
    """Every rank's obj, in rank order, on every rank ([obj] when world is 1): a collective."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def random_states(gen, world, device):
    """Every rank's random state, for a checkpoint: its data draws (gen), torch's own and the
    GPU's. A collective: every rank calls it at the same step."""
    state = dict(data=gen.get_state(), torch=torch.get_rng_state(),
                 **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}))
    return gather(state, world)


def restore_random(resumed, gen, rank, world, device):
    """--resume: the random state this rank saved (resumed["rng"], from random_states), so the run
    draws what an uninterrupted run would have; on another number of ranks the draws start anew."""
    if resumed is None:
        return
    states = resumed.get("rng") or []
    if len(states) != world:
        print0(f"resuming on {world} rank(s) a run saved on {len(states) or 'unknown'}: the data is drawn anew")
        return
    gen.set_state(states[rank]["data"])
    torch.set_rng_state(states[rank]["torch"])
    if "cuda" in states[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


# ----------------------------------------------------------------------------- masks
def iou(a, b):
    """IoU of two bool arrays (N, H, W), per leading index; an empty union counts as IoU 1."""
    a, b = np.asarray(a), np.asarray(b)
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def resize_image(image, S):
    """uint8 (H, W, 3) -> (S, S, 3), a plain bilinear resize (aspect ratio not kept)."""
    if image.shape[:2] == (S, S):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((S, S), Image.BILINEAR))


PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)])


def overlay(image, masks, alpha=0.55):
    """Coloured masks over an RGB image (H, W, 3) uint8 -> uint8; mask i gets PALETTE[i]."""
    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * PALETTE[i % len(PALETTE)]
    return out.astype(np.uint8)
