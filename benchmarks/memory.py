"""
Peak memory against dataset size: tokenizer.py and sft.py on jsonl folders of 512 px scenes, one
four times the other (mem_images training images, then 4x), each stage run as a user runs it with
--data=FOLDER, streamed (data/stream.py, the default for data on disk) and, side by side, with
--stream=false (the whole split in memory). What grows with the dataset shows as the difference.

Measured on the whole process tree (the stage and its DataLoader workers), sampled every 0.5 s:
the proportional set size (PSS: a page shared by the forked workers counted once, split between
them) and the stage process's own resident set (RSS). Kept identical between the two sizes:
every option, the steps, the seed, the evaluation split sizes (--n_val / --n_test / --eval_n
below what the small folder holds); only the number of training images differs.
"""

import os
import subprocess
import sys
import time

from bench import ROOT, table
from common import UserError

TRAIN_SHARE = 0.9           # data.coco.split_of: 90 % of a folder's names hash into the train split


def tree_memory(pid):
    """(PSS of pid and all its descendants, RSS of pid) in MB, from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    pss = rss = 0
    for p in tree:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:") and p == pid:
                    rss = int(line.split()[1])
        except OSError:
            pass
    return pss / 1024, rss / 1024


def peak_memory(args):
    """Run a stage script; -> (peak tree PSS MB, peak own RSS MB, seconds)."""
    t0, peak = time.time(), [0.0, 0.0]
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=null, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            peak = [max(a, b) for a, b in zip(peak, tree_memory(proc.pid))]
            time.sleep(0.5)
        err = proc.stderr.read()
    if proc.returncode != 0:
        lines = [x for x in err.splitlines() if x.strip()]
        raise UserError(f"{' '.join(args)} exited with code {proc.returncode}: {lines[-1] if lines else ''}")
    return peak[0], peak[1], time.time() - t0


def measure(cfg, device):
    from data.jsonl import write_folder
    n = cfg["mem_images"]
    out, rows, figures = os.path.abspath(cfg["mem_out"]), [], {}
    common = {"tokenizer.py": ["--image_size=512", f"--steps={cfg['mem_steps']}", "--pretrain_steps=5", "--batch_size=4",
                               "--pretrain_batch=4",
                               "--unquantized_steps=5", "--kmeans_samples=512", "--eval_every=0", "--n_val=2",
                               "--n_test=2", "--log_every=10"],
              "sft.py": [f"--steps={cfg['mem_steps']}", "--eval_n=2", "--log_every=10", "--vision_pretrain_steps=20",
                         "--built_scenes=64",   # the config-built model's BPE and tower read a prefix: below both sizes
                         f"--tokenizer_ckpt={os.path.abspath(cfg['tokenizer_ckpt'])}"]}
    if not os.path.exists(cfg["tokenizer_ckpt"]):
        raise UserError(f"memory: no Stage-1 tokenizer at {cfg['tokenizer_ckpt']} (python tokenizer.py first)")
    for size in (n, 4 * n):
        folder = os.path.join(out, f"data{size}")
        if not os.path.exists(os.path.join(folder, "annotations.jsonl")):
            write_folder(folder, "train", round(size / TRAIN_SHARE), size=512)   # ~size training images
        for script, args in common.items():
            for stream in ("true", "false"):
                name = f"{script[:-3]}_{'streamed' if stream == 'true' else 'in_memory'}"
                pss, rss, sec = peak_memory([os.path.join(ROOT, script), f"--data={folder}", f"--device={device.type}",
                                             f"--stream={stream}", f"--out_dir={os.path.join(out, f'{name}{size}')}", *args])
                figures[f"{name}_{size}"] = dict(pss_mb=pss, rss_mb=rss, seconds=sec)
                print(f"{script} --stream={stream} on ~{size} training images: peak PSS {pss:.0f} MB (stage process RSS "
                      f"{rss:.0f} MB), {sec:.0f} s", flush=True)
    for script in common:
        for path in ("streamed", "in_memory"):
            name = f"{script[:-3]}_{path}"
            a, b = figures[f"{name}_{n}"], figures[f"{name}_{4 * n}"]
            rows.append([script, path.replace("_", " "), f"{a['pss_mb']:.0f}", f"{b['pss_mb']:.0f}",
                         f"{b['pss_mb'] - a['pss_mb']:+.0f}", f"{b['rss_mb'] - a['rss_mb']:+.0f}"])
            figures[f"{name}_growth_mb"] = b["pss_mb"] - a["pss_mb"]
    print(table(["stage", "data", f"peak PSS MB, ~{n} images", f"~{4 * n} images", "growth (PSS)", "growth (RSS)"], rows))
    return {"memory": figures}
