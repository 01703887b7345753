"""
Benchmarks, like nanoGPT's bench.py: measurements that explain the figures the stages report, and
the same work done side by side with the libraries a reader already knows, on the same inputs,
as ratios. One file per comparison in benchmarks/; each section runs on its own (--only=rvq,encodings),
prints a markdown table and merges its figures into out/bench.json.

Sections (--only takes a comma list of these names):
  resolution  ideal-logit reference of SAM2's 4x-grid decoder on the synthetic world (no model)
  rvq         quantizer.ResidualVQ against vector-quantize-pytorch's ResidualVQ at 2 x 256, dim 256,
              EMA 0.99, plain straight-through: forward + backward time, and code agreement
  encodings   mask encodings at a token budget on the test split: SAMTok's 2 codes (4 tokens), a
              box (4 tokens), polygons of k vertices (2k tokens), RLE: tokens per mask vs mIoU
  sft         sft.py's training tokens/s and loss after N steps against TRL's SFTTrainer, same
              tiny VLM, data, batches, steps, one process
  grpo        grpo.py's completions/s and step time against TRL's GRPOTrainer
  memory      peak memory of tokenizer.py and sft.py streaming jsonl folders of 512 px scenes, ~120
              against ~480 training images: what grows with the dataset (--only=memory)
  gpu         (--gpu_check) one command, designed for < 5 minutes on one H200, random-init models of
              the real sizes: tokenizer training at SAM2.1-L / 1024 px, SFT at Qwen2.5-VL-3B in bf16
              (tokens/s, MFU), GRPO generation (completions/s). --dry_run: the same code, tiny, CPU.

    python bench.py                                # resolution, rvq, encodings, sft, grpo on CPU
    python bench.py --only=sft                     # one section (or a comma list: --only=rvq,encodings)
    python bench.py --device=cuda                  # the timed sections on a GPU
    python bench.py --gpu_check                    # the real-size GPU check
    python bench.py --dry_run                      # the GPU check's code paths at tiny sizes, CPU
    python bench.py --only=resolution --image_size=256 --n=200

Options are --key=value or --key value (python bench.py --help lists them). The peers are optional,
never needed by the stages or the tests; a section whose peer is missing says so and records null:
    pip install vector-quantize-pytorch==1.32.0 trl==1.16.0
The encodings and sft sections read the Stage-1 tokenizer (out/tokenizer/ckpt.pt: python tokenizer.py),
the grpo section the Stage-2 model (out/sft: python sft.py). Timings are wall clock on whatever else
shares the machine: run it alone for figures to quote.
"""

import importlib
import os
import subprocess
import sys
import time

import torch

from common import UserError, configure, read_json, run, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))   # where the stage scripts are
PEER_PIP = "pip install vector-quantize-pytorch==1.32.0 trl==1.16.0"
SECTIONS = ("resolution", "rvq", "encodings", "sft", "grpo", "memory", "gpu")   # = the modules of benchmarks/

DEFAULTS = dict(
    only="resolution,rvq,encodings,sft,grpo",   # comma list of SECTIONS
    device="auto",              # auto | cpu | cuda (timed sections)
    out="out/bench.json",
    seed=0,
    # resolution: ideal-logit reference
    image_size=128, n=100, grids=(32, 48, 64),
    # rvq: the paper's quantizer shape; batches of masks a step (tiny preset ~56, paper 1024 a GPU)
    rvq_levels=2, rvq_codes=256, rvq_dim=256, rvq_batches=(64, 1024), rvq_rounds=15, rvq_calls=10,
    # encodings
    tokenizer_ckpt="out/tokenizer/ckpt.pt",
    enc_scenes=500,             # test scenes (500 = the tokenizer's test split)
    poly_vertices=(4, 8, 16, 32),
    bins=256,                   # coordinate bins of the box and polygon tokens
    # sft: sft.py (its own process) against TRL's SFTTrainer (this process)
    sft_steps=30, sft_warmup=3,  # steps timed after sft_warmup untimed ones, on both sides
    sft_repeats=3,              # runs a side, alternating (ABBA...): the median counts
    # extra sft.py options, the same for both sides: the whole model trains, on the plain loss TRL computes
    # (the model and mixture of the figures in docs/benchmarks.md)
    sft_args="--n_train=200 --patch_size=16 --vision_pretrain_steps=0 --word_soft=0 --model_type=qwen2_5_vl --refer_repeat=1",
    sft_out="out/bench/sft",
    # grpo: grpo.py (its own process, from the Stage-2 model in out/sft) against TRL's GRPOTrainer
    grpo_steps=6, grpo_warmup=1, grpo_args="--n_train=100", grpo_out="out/bench/grpo",
    # memory: the two folder sizes (training images), the steps of each run
    mem_images=120, mem_steps=10, mem_out="out/bench/memory",
    # gpu check: real sizes, random init, one GPU
    gpu_check=False, dry_run=False,
    gpu_steps=8, gpu_warmup=3,
    gpu_tok_images=16, gpu_tok_masks=8,         # SAM2.1-L tokenizer: 16 images x 8 masks a step
    gpu_sft_batch=4, gpu_sft_image=448,          # Qwen2.5-VL-3B: conversations a step (~80 GB), px
    gpu_gen_prompts=8, gpu_gen_group=16, gpu_gen_tokens=64,   # GRPO: prompts x G completions
    peak_tflops=989.0,          # H100 / H200 dense bf16 peak, for the MFU
)
PRESETS = {"tiny": {}, "paper": {}}


# ----------------------------------------------------------------------------- shared by the sections
def pick_device(pref):
    if pref == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but torch sees no GPU")
    return torch.device("cuda" if pref in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def sync(device):
    """Wait for the GPU's queued work: without it a clock reads the launch time, not the run time."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def table(header, rows):
    """A markdown table as a string; floats get 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def by_area(ious, area):
    """mIoU per mask-area bucket of the tokenizer's test (buckets without masks left out)."""
    from tokenizer import AREA_BUCKETS
    return {name: float(ious[(area >= lo) & (area < hi)].mean()) for lo, hi, name in AREA_BUCKETS
            if ((area >= lo) & (area < hi)).any()}


def peer_missing(module, section, figures):
    """A peer library that is not installed: None if it is, else the section's null figures."""
    try:
        importlib.import_module(module)
        return None
    except ImportError:
        peer = module.replace("_", "-")
        print(f"{section}: {peer} is not installed ({PEER_PIP}); skipped")
        return {**dict.fromkeys(figures), section: {"skipped": f"{peer} missing"}}


def timed_steps(cfg, section):
    """(N, w): a section's steps and its untimed warm-up steps (the first steps pay for compilation,
    caches and allocator growth on both sides)."""
    N, w = cfg[f"{section}_steps"], cfg[f"{section}_warmup"]
    if N <= w:
        raise UserError(f"--{section}_steps={N} must be larger than --{section}_warmup={w}")
    return N, w


def stage_args(cfg, section, steps, device):
    """The options a stage script runs with in a section: the section's extra options, then its own
    out_dir, one step line a step and nothing else on the way (no evaluation, no checkpoint before
    the end)."""
    return [a for a in cfg[f"{section}_args"].split() if a] + [
        f"--out_dir={cfg[f'{section}_out']}", f"--tokenizer_ckpt={cfg['tokenizer_ckpt']}", f"--steps={steps}",
        "--eval_n=0", "--log_every=1", f"--ckpt_every={10 ** 9}", f"--device={device.type}", f"--seed={cfg['seed']}"]


def run_script(script, args):
    """A stage script in its own process, exactly as a user runs it -> its stdout (its step lines)."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
        raise UserError(f"{script} {' '.join(args)} exited with code {proc.returncode}: "
                        f"{lines[-1] if lines else '(no message)'}")
    return proc.stdout


def step_clock(device):
    """A Trainer callback that times each optimizer step from the end of the previous one (the
    first from the start of training): wall clock of everything the Trainer does between two
    steps, data loading and collation included (the Trainer fetches a step's batches before
    its on_step_begin), as sft.py's and grpo.py's step lines count theirs. Keeps the logs."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last, self.seconds, self.logs = 0.0, [], []

        def on_train_begin(self, args, state, control, **kw):
            sync(device)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))
    return StepClock()


# ----------------------------------------------------------------------------- main
def main():
    from transformers.utils import logging
    logging.disable_progress_bar()      # no bar per weight file
    # --gpu_check and --dry_run also work as bare flags
    argv = sys.argv[1:]
    argv = [a + "=true" if a in ("--gpu_check", "--dry_run") and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
            else a for i, a in enumerate(argv)]
    cfg = configure(DEFAULTS, PRESETS, argv, doc=__doc__)
    if cfg["gpu_check"] or cfg["dry_run"]:
        cfg["only"] = "gpu"
    only = [s for s in cfg["only"].split(",") if s]
    if not only or not set(only) <= set(SECTIONS):
        raise UserError(f"--only={cfg['only']!r}: choose from {','.join(SECTIONS)}")
    device = pick_device("cpu" if cfg["dry_run"] else cfg["device"])
    if "gpu" in only and not cfg["dry_run"] and device.type != "cuda":
        raise UserError("--gpu_check needs a GPU; --dry_run runs its code paths at tiny sizes on CPU")
    # each section is imported only when it runs (a missing peer or checkpoint stops no other one);
    # the sections import their shared helpers from this file, as the module bench
    results = {}
    for name in only:
        print(f"\n## {name}\n")
        t = time.time()
        results.update(importlib.import_module(f"benchmarks.{name}").measure(cfg, device))
        print(f"({name}: {time.time() - t:.0f} s)")
    # merge into what earlier runs of other sections wrote
    try:
        old = read_json(cfg["out"])
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    old.update(results)
    old["last_run"] = {"sections": only, "device": str(device), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "torch_threads": torch.get_num_threads()}
    write_json(cfg["out"], old)
    rows = summary_rows(old)
    if rows:
        print("\n## summary (all figures in " + cfg["out"] + ")\n")
        print(table(["figure", "measured", "target", "reached"], rows))
    print(f"\nwrote {cfg['out']} ({', '.join(only)})")


def summary_rows(r):
    """The headline figures in out/bench.json against what each comparison sets out to show: our
    quantizer at least as fast as the library's with the very same codes, two words at least as good
    as 16-vertex polygons, and the stages faster than TRL's trainers on the same work."""
    rows = []
    yes = lambda ok: "yes" if ok else "no"
    if r.get("rvq_speed_ratio") is not None:
        rows.append(["quantizer speed, ours / vector-quantize-pytorch", f"{r['rvq_speed_ratio']:.2f}x", ">= 1.0x",
                     yes(r["rvq_speed_ratio"] >= 1.0)])
    if r.get("rvq_codes_agree") is not None:
        rows.append(["quantizer codes identical", f"{r['rvq_codes_agree']:.2%}", "100%", yes(r["rvq_codes_agree"] == 1.0)])
    enc = r.get("encodings") if isinstance(r.get("encodings"), dict) else {}
    if "SAMTok, 2 codes" in enc and "polygon, 16 vertices" in enc:
        a, b = enc["SAMTok, 2 codes"]["miou"], enc["polygon, 16 vertices"]["miou"]
        rows.append(["mIoU, SAMTok 2 codes (4 tokens) vs 16-vertex polygons (32 tokens)", f"{a:.3f} vs {b:.3f}",
                     ">= polygons", yes(a >= b)])
    for key, name, goal in (("sft_speed_ratio", "SFT tokens/s, sft.py / TRL SFTTrainer", 1.2),
                            ("grpo_speed_ratio", "GRPO completions/s, grpo.py / TRL GRPOTrainer", 4.0)):
        if r.get(key) is not None:
            rows.append([name, f"{r[key]:.2f}x", f">= {goal}x", yes(r[key] >= goal)])
    return rows


if __name__ == "__main__":
    run(main)
