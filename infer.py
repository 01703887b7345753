"""
SAMTok inference: ask the trained VLM about an image, get text whose masks are words, paint them.

"We represent any mask with two words." The VLM of sft.py (or grpo.py) answers a chat turn about
an image; wherever it means a region it writes <|mt_start|><|mt_00xx|><|mt_0yyy|><|mt_end|>.
Those two codes go back through the Stage-1 tokenizer's decoder (tokenizer.py), which paints the
mask over the same image at the image's own size: no mask head, no pixels in the VLM. The other
way round, --mask encodes a region you drew into its two words and puts them in the prompt
(region captioning: "Describe the region {mask} in detail.").

Run it (after python tokenizer.py and python sft.py; data/example.jpg ships with the repository):
    python infer.py data/example.jpg "Please segment the red circle in this image."
    python infer.py data/example.jpg "Describe the region {mask} in detail." --mask=REGION.png
    python infer.py IMAGE "PROMPT" --ckpt=out/grpo/model --out=out/infer --device=cuda
Options are --key=value or --key value (--help lists them), before or after the two positionals,
the image and the prompt. Prints the answer with each mask shown as [mask 1], [mask 2], ... and
writes, in --out, one PNG per mask (white on black, the image's size), an overlay of all of them
with a legend, and a JSON with the generated words, the codes and the file names.

The paper's referring benchmarks instead of one image: RefCOCO, RefCOCO+, RefCOCOg (cIoU) and
gRefCOCO (gIoU, cIoU, N-acc), every split of the paper's tables, for any checkpoint (ours or a
released SAMTok folder); prints both tables and writes --out/benchmark.json:
    python infer.py --benchmark=data/ref_seg --ckpt=FOLDER                          # CPU or one GPU
    torchrun --standalone --nproc_per_node=8 infer.py --benchmark=data/ref_seg --ckpt=FOLDER
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_ADDR:29500 infer.py --benchmark=data/ref_seg --ckpt=FOLDER
(each rank answers its share of the images; the sums are added at the end of each split).
"""

import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

from common import PALETTE, UserError, configure, die, is_master, overlay, print0, resize_image
from data.tasks import REF_END, REF_START
from samtok import codes_to_text, load_tokenizer, mask_tokens, released_files, text_to_codes

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- config
DEFAULTS = dict(
    ckpt="",                    # a VLM folder (save_pretrained); empty: the newest of out/grpo/model, out/sft/model
    tokenizer_ckpt="",          # Stage-1 checkpoint; empty: the one the VLM was trained with (its stage_config.json),
                                # or a released model's own mask_tokenizer_*.pth
    sam2_ckpt="",               # SAM2.1 file for a released tokenizer without its image encoder; empty: the one beside it
    image_size=0,               # the VLM's square input size; 0: the one it was trained at, or a released model's native one
    mask="",                    # a region PNG (white on black) whose two words replace {mask} in the prompt
    out="out/infer",            # where the mask PNGs, the overlay and the JSON go
    device="auto",              # auto | cpu | cuda
    dtype="auto",               # auto (bf16 on GPU; fp32 on CPU, bf16 if fp32 does not fit) | fp32 | bf16
    max_new_tokens=256,         # a mask is 4 tokens; a grounded description of 6 objects is ~100
    max_pixels=89_478_485,      # larger images are refused (PIL's decompression-bomb limit by default)
    # the referring benchmarks (no image or prompt then): python infer.py --benchmark=FOLDER
    benchmark="",               # a folder with refcoco/, refcoco+/, refcocog/, grefcoco/ (see find_benchmarks)
    bench_sets="refcoco,refcoco+,refcocog,grefcoco",    # which of them; the default skips the missing ones
    bench_images="",            # COCO train2014 images of all four; empty: looked for inside --benchmark
    bench_limit=0,              # the first images of each split only (0: all of them), for a quick look
    eval_batch=16,              # prompts generated together
)
# The checkpoint carries its own architecture and input size, so the presets only set budgets.
PRESETS = {"tiny": {}, "paper": dict(max_new_tokens=1024)}

# ----------------------------------------------------------------------------- reading the inputs
# EXIF orientation tag -> the PIL transpose that shows the image upright (as ImageOps.exif_transpose)
EXIF_ORIENTATION = 0x0112
UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
           6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def read_image(path, max_pixels, what="image"):
    """Any image file PIL reads -> uint8 (H, W, 3), upright. data.load_rgb does the pixel
    conversion (palette, grayscale, RGBA with alpha dropped, 16-bit scaled by 1/257); here come
    the checks a command line needs: every failure is one UserError that says what to do."""
    from PIL import Image
    from data import load_rgb
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path!r} is not readable (permission denied)")
    # PIL's decompression-bomb guard warns above MAX_IMAGE_PIXELS and raises above twice that,
    # in the middle of decoding. We check the size from the header instead, against our own
    # limit, so a big image gets one line with the way out (--max_pixels), not a warning.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        try:
            with Image.open(path) as img:          # reads the header only
                w, h = img.size
        except Exception as e:       # UnidentifiedImageError, or a header PIL cannot parse
            raise UserError(f"{what} {path!r} is not an image PIL can read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no details'})")
        if w * h > max_pixels:
            raise UserError(f"{what} {path!r} is {w}x{h} = {w * h / 1e6:.0f} Mpx, over the limit of "
                            f"{max_pixels / 1e6:.0f} Mpx: downscale it, or raise --max_pixels if it is trusted")
        try:
            image = load_rgb(path)   # decodes the whole file: truncated data fails here
            with Image.open(path) as img:
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        except Exception as e:
            raise UserError(f"{what} {path!r} cannot be decoded, truncated or corrupt? ({str(e).splitlines()[0]})")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if orientation in UPRIGHT:       # a phone photo stored sideways: show it (and mask it) upright
        image = np.asarray(Image.fromarray(image).transpose(getattr(Image.Transpose, UPRIGHT[orientation])))
    return image if image.flags.writeable else image.copy()    # torch warns on read-only arrays


def read_region(path, shape, max_pixels):
    """A region mask image -> bool (H, W) at the image's size. Foreground: pixels above half
    intensity (any channel), or == 1 in a 0/1 label image. A mask drawn on a scaled copy of the
    image (same aspect ratio within 2%) is resized, nearest neighbour; another shape is refused,
    since no placement of it on the image is the obvious one."""
    m = read_image(path, max_pixels, what="region mask").max(-1)       # (h, w) uint8
    fg = m > (0 if m.max() <= 1 else 127)
    H, W = shape
    if fg.shape != (H, W):
        h, w = fg.shape
        if abs(math.log((w / h) / (W / H))) > 0.02:
            raise UserError(f"region mask {path!r} is {w}x{h} but the image is {W}x{H}: a mask of another "
                            f"shape cannot be placed on it; draw it on the image itself")
        from PIL import Image
        fg = np.asarray(Image.fromarray(fg).resize((W, H), Image.NEAREST))
    if not fg.any():
        raise UserError(f"region mask {path!r} is empty (no pixel above half intensity): draw the region in "
                        f"white on black")
    return fg

# ----------------------------------------------------------------------------- the checkpoints
STAGE_DIRS = ("out/grpo/model", "out/sft/model")


def find_checkpoint(ckpt):
    """The VLM folder to load and its training config (what the stage saved beside it).
    Empty ckpt: the most recently written of out/grpo/model and out/sft/model. A stage's out_dir
    (out/sft) is taken to mean its model folder; a checkpoint of another stage is refused."""
    if not ckpt:
        found = [d for d in STAGE_DIRS if os.path.isfile(os.path.join(d, "config.json"))]
        if not found:
            raise UserError(f"no checkpoint in {' or '.join(STAGE_DIRS)}: train one with `python sft.py`, "
                            f"or pass --ckpt=DIR")
        ckpt = max(found, key=lambda d: os.path.getmtime(os.path.join(d, "config.json")))
    if not os.path.exists(ckpt):
        raise UserError(f"checkpoint folder {ckpt!r} does not exist")
    tokenizer_file = ckpt if os.path.isfile(ckpt) else os.path.join(ckpt, "ckpt.pt")
    if os.path.isfile(tokenizer_file) and not os.path.exists(os.path.join(ckpt, "config.json")):
        raise UserError(f"{ckpt!r} is a Stage-1 checkpoint (tokenizer.py); --ckpt takes the VLM folder of "
                        f"sft.py or grpo.py, e.g. --ckpt=out/sft/model (pass this one as --tokenizer_ckpt)")
    if os.path.isfile(ckpt):
        raise UserError(f"--ckpt takes a folder written by sft.py or grpo.py, e.g. out/sft/model; {ckpt!r} is a file")
    if not os.path.isfile(os.path.join(ckpt, "config.json")) and os.path.isfile(os.path.join(ckpt, "model", "config.json")):
        ckpt = os.path.join(ckpt, "model")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise UserError(f"{ckpt!r} holds no saved model (no config.json): pass the model folder of sft.py or "
                        f"grpo.py, e.g. --ckpt=out/sft/model")
    # vlm.save_checkpoint (of sft.py and grpo.py) writes the stage's config beside the weights
    from vlm import stage_config
    return ckpt, stage_config(ckpt)


def resolve(path):
    """A path saved in a stage config is relative to where the stage ran, the repository root
    as a rule: try the current folder first, then the root."""
    if os.path.isabs(path) or os.path.exists(path) or not os.path.exists(os.path.join(ROOT, path)):
        return path
    return os.path.join(ROOT, path)


def cpu_dtype(ckpt, free=None):
    """--dtype=auto on a CPU: fp32, which measured 4.7x faster than bf16 for a 3.75B Qwen2.5-VL on
    an AVX2 CPU without bf16 arithmetic (docs/LOG.md), unless its fp32 weights would not fit: loading
    a bf16 folder as fp32 peaks at the fp32 copy plus the file (22.4 GB for that model), bf16 at
    9.2 GB. Then bf16, said in one line."""
    files = [os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith((".safetensors", ".bin"))]
    on_disk = sum(os.path.getsize(f) for f in files)
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    fp32 = on_disk * (2 if (config.get("dtype") or config.get("torch_dtype")) in ("bfloat16", "float16") else 1)
    try:
        if free is None:     # bytes of memory available (Linux); elsewhere fp32 is assumed to fit
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return torch.float32
    if fp32 + on_disk > 0.9 * free:
        print(f"the VLM's fp32 weights ({fp32 / 2 ** 30:.1f} GB, {(fp32 + on_disk) / 2 ** 30:.1f} GB while loading) "
              f"do not fit in the {free / 2 ** 30:.1f} GB of free memory: loading it in bf16 (slower on most CPUs; "
              f"--dtype=fp32 to insist)")
        return torch.bfloat16
    return torch.float32


def load(cfg):
    """-> (VLM, processor, Stage-1 tokenizer, the VLM's input size S, the checkpoint folder,
    the tokenizer checkpoint path)."""
    from transformers.utils import logging as hf_logging
    from vlm import load_pretrained
    hf_logging.disable_progress_bar()    # a bar for loading a few MB of weights is noise here
    ckpt, stage = find_checkpoint(cfg["ckpt"])
    # Our checkpoints name their tokenizer and input size (stage_config.json). A released model
    # (the authors' folders) carries its tokenizer inside and reads images at the processor's
    # native resolution, aspect ratio kept, as it was trained: S = 0, no square resize.
    released = released_files(ckpt) if not stage else None
    S = cfg["image_size"] or stage.get("image_size", 0)
    tok_path = cfg["tokenizer_ckpt"] or (resolve(stage["tokenizer_ckpt"]) if stage.get("tokenizer_ckpt") else "") \
        or (ckpt if released else "")
    if not tok_path:
        raise UserError(f"{ckpt!r} has no stage_config.json and no mask_tokenizer_*.pth, so neither sft.py, grpo.py nor "
                        f"the authors wrote it: pass --tokenizer_ckpt=PATH (and --image_size=PIXELS if it was trained square)")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device takes auto, cpu or cuda, got {cfg['device']!r}")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA device is available")
    device = torch.device("cuda" if cfg["device"] != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = {"auto": cpu_dtype(ckpt) if device.type == "cpu" else torch.bfloat16, "fp32": torch.float32,
             "bf16": torch.bfloat16}.get(cfg["dtype"])
    if dtype is None:
        raise UserError(f"--dtype takes auto, fp32 or bf16, got {cfg['dtype']!r}")
    model, processor = load_pretrained(ckpt, dict(image_size=S), dtype)
    vocab = processor.tokenizer.get_vocab()
    if not all(w in vocab for w in mask_tokens()):
        raise UserError(f"{ckpt!r} is a Qwen-VL without the 514 mask words, not a SAMTok checkpoint: train it "
                        f"with sft.py first")
    try:
        mask_tok = load_tokenizer(tok_path, device, cfg["sam2_ckpt"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:      # a checkpoint of other keys or shapes
        raise UserError(f"cannot load the tokenizer checkpoint {tok_path!r}: {type(e).__name__}: {e}")
    return model.to(device).eval(), processor, mask_tok, S, ckpt, tok_path

# ----------------------------------------------------------------------------- the answer
# a run of consecutive mask words; text_to_codes splits a run into its spans
MASK_RUN = re.compile(r"(?:<\|mt_(?:start|end|\d{4})\|>)+")


ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)      # R1-style: <think>...</think><answer>...</answer>


def authors_format(text):
    """The released models' answer formats in ours: the part inside <answer>...</answer>, and a JSON
    list [{"mask_2d": "<|mt_start|>...<|mt_end|>", "label": "..."}, ...] as grounded phrases, each
    <|object_ref_start|>label<|object_ref_end|> followed by its mask words. Other text is returned as it is."""
    if m := ANSWER.search(text):
        text = m.group(1).strip()
    start, end = text.find("["), text.rfind("]")
    try:
        items = json.loads(text[start:end + 1]) if 0 <= start < end else None
    except ValueError:
        return text
    if not isinstance(items, list) or not items or not all(isinstance(d, dict) and isinstance(d.get("mask_2d"), str)
                                                            for d in items):
        return text
    return ", ".join(f"{REF_START}{d.get('label') or ''}{REF_END}{d['mask_2d']}" for d in items)


def read_answer(text):
    """Generated text -> (the answer with [mask k] markers, [(c1, c2)], [label], malformed count).
    Each run of mask words is parsed with the tokenizer's tolerant text_to_codes (PAPER.md
    section 2 repairs: 3+ codes keep two, one code -> level 2 = -1, an out-of-place id -> -1);
    a span without a valid level-1 code cannot be decoded and shows as [malformed mask]. The
    label of a mask is the grounded phrase in <|object_ref_start|>...<|object_ref_end|> right
    before it (grounded conversation), if any; the authors' formats are read too (authors_format).
    Never raises, whatever the text."""
    text = authors_format(text)
    out, codes, labels, bad, last = [], [], [], 0, 0
    for m in MASK_RUN.finditer(text):
        before = text[last:m.start()]
        phrase = None
        if before.rstrip().endswith(REF_END) and REF_START in before:
            phrase = before.rstrip()[:-len(REF_END)].rsplit(REF_START, 1)[1].strip() or None
        out.append(before)
        markers = []
        spans = text_to_codes(m.group())
        for c1, c2 in spans:
            if c1 < 0:
                bad += 1
                markers.append("[malformed mask]")
                continue
            codes.append((c1, c2))
            labels.append(phrase)
            markers.append(f"[mask {len(codes)}]")
        if not spans:                # e.g. <|mt_start|><|mt_end|>: mask words but no code
            bad += 1
            markers.append("[malformed mask]")
        pad_l = " " if before and not before[-1].isspace() else ""
        pad_r = " " if text[m.end():m.end() + 1].isalnum() else ""
        out.append(pad_l + " ".join(markers) + pad_r)
        last = m.end()
    out.append(text[last:])
    answer = "".join(out).replace(REF_START, "").replace(REF_END, "")
    return answer.strip(), codes, labels, bad


def decode_masks(mask_tok, image, codes):
    """The Stage-1 decoder paints each (c1, c2) over the image at the image's own size. In
    chunks: its logits are upsampled to H x W in float32 before the threshold, 256 MB a mask
    at 8000 x 8000, so a chunk holds as many masks as fit in ~1 GB."""
    H, W = image.shape[:2]
    chunk = max(1, 2 ** 28 // (H * W))
    parts = [mask_tok.decode(image, np.array(codes[i:i + chunk])) for i in range(0, len(codes), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, H, W), bool)


def chat(model, processor, image, prompt, max_new_tokens):
    """One user turn (the image, then the prompt), greedy, through exactly the tokenization and
    generation code of training and evaluation (vlm.tokenize / vlm.generate)."""
    from vlm import generate, tokenize
    convs, _ = tokenize([[dict(prompt=prompt, answer="", img=0)]], [image], processor, max_len=10 ** 9)
    limit = model.config.get_text_config().max_position_embeddings
    if len(convs[0]["ids"]) + max_new_tokens > limit:
        raise UserError(f"the prompt is {convs[0]['n_prompt']} tokens with the image; with --max_new_tokens="
                        f"{max_new_tokens} that exceeds the model's {limit} positions: shorten it")
    return generate(model, processor, convs, [image], max_new_tokens, batch=1)[0]

# ----------------------------------------------------------------------------- the pictures


def draw_overlay(image, masks, labels, codes, prompt, region=None):
    """The masks in PALETTE colours over the image, each with an outline in its colour and the
    rest of the image dimmed (so a red mask over a red object still shows), the --mask region
    (if any) outlined in white, and a legend strip underneath: the prompt, then one line per
    mask (colour swatch, mask k, grounded phrase, codes). It is a picture for a person, so it
    is drawn at a size one can look at: a small image is enlarged (nearest neighbour, pixels
    stay visible), a huge one reduced to 2048 px; the mask PNGs keep the image's own size."""
    from PIL import Image, ImageDraw, ImageFont
    H, W = image.shape[:2]
    long = max(H, W)
    scale = math.ceil(512 / long) if long < 512 else min(1.0, 2048 / long)
    Hd, Wd = max(1, round(H * scale)), max(1, round(W * scale))
    shapes = list(masks) + ([region] if region is not None else [])
    if (Hd, Wd) != (H, W):
        up = scale > 1             # enlarge: nearest neighbour; reduce: area-like (PIL's reducing filters)
        image = np.asarray(Image.fromarray(image).resize((Wd, Hd), Image.NEAREST if up else Image.BILINEAR))
        shapes = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
            (Wd, Hd), Image.NEAREST if up else Image.BILINEAR)) > 127 for m in shapes]
    pic = image.copy()
    if shapes:
        rest = ~np.any(shapes, 0)
        pic[rest] = (pic[rest] * 0.6).astype(np.uint8)
        pic = overlay(pic, shapes[:len(masks)])
        width = max(1, max(Hd, Wd) // 300)
        for i, m in enumerate(shapes):     # outline = the mask minus its erosion by `width` px
            inner = m.copy()
            for _ in range(width):
                inner[1:] &= inner[:-1].copy()
                inner[:-1] &= inner[1:].copy()
                inner[:, 1:] &= inner[:, :-1].copy()
                inner[:, :-1] &= inner[:, 1:].copy()
            pic[m & ~inner] = PALETTE[i % len(PALETTE)] if i < len(masks) else 255
    size = min(60, max(12, round(max(Wd, 512) / 32)))
    font = ImageFont.load_default(size=size)
    lines = [(None, f"prompt: {prompt}")]
    if region is not None:
        lines.append(((255, 255, 255), "region: the {mask} of the prompt"))
    for i in range(len(masks)):
        same = codes.index(codes[i])
        text = (f"mask {i + 1}" + (f": {labels[i]}" if labels[i] else "") + f"  ({codes[i][0]}, {codes[i][1]})"
                + (f" = mask {same + 1}" if same < i else "") + ("" if masks[i].any() else ", empty"))
        lines.append((PALETTE[i % len(PALETTE)], text))
    if not len(masks):
        lines.append((None, "no mask"))
    Wc, step = max(Wd, 512), round(size * 1.4)
    canvas = Image.new("RGB", (Wc, Hd + step * len(lines) + size // 2), "white")
    canvas.paste(Image.fromarray(pic), ((Wc - Wd) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (colour, text) in enumerate(lines):
        y, x = Hd + size // 4 + row * step, size // 3
        if colour is not None:
            draw.rectangle([x, y + size // 8, x + size, y + size + size // 8], fill=tuple(int(c) for c in colour),
                           outline=(90, 90, 90))
            x += size + size // 2
        while len(text) > 1 and draw.textlength(text, font=font) > Wc - x:   # cut what does not fit
            text = text[:-2] + "…"
        draw.text((x, y), text, fill="black" if colour is not None else (90, 90, 90), font=font)
    return canvas


def write_outputs(out_dir, stem, image, masks, labels, codes, prompt, record, region=None):
    """One PNG per mask, the overlay and the JSON, each written under a temporary name and
    renamed, and masks left over from an earlier run on an image of the same name removed: the
    folder never holds a mix of two runs."""
    from PIL import Image
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out_dir!r}: {e.strerror}")
    files = {f"{stem}_mask{i + 1}.png": Image.fromarray(m.astype(np.uint8) * 255) for i, m in enumerate(masks)}
    files[f"{stem}_overlay.png"] = draw_overlay(image, masks, labels, codes, prompt, region)
    record["files"] = [os.path.join(out_dir, f) for f in files] + [os.path.join(out_dir, f"{stem}.json")]
    tmps = []
    try:
        for name, pic in files.items():
            tmps.append(os.path.join(out_dir, f".{name}.tmp"))
            pic.save(tmps[-1], format="PNG", compress_level=1)   # fast: big images stay quick to write
        tmps.append(os.path.join(out_dir, f".{stem}.json.tmp"))
        with open(tmps[-1], "w") as f:
            json.dump(record, f, indent=2)
    except OSError as e:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)
        raise UserError(f"cannot write to {out_dir!r}: {e.strerror or e}")
    stale = re.compile(re.escape(stem) + r"_mask\d+\.png")
    for f in os.listdir(out_dir):
        if stale.fullmatch(f) and f not in files:
            os.remove(os.path.join(out_dir, f))
    for t, final in zip(tmps, record["files"]):
        os.replace(t, final)
    return record["files"]

# ----------------------------------------------------------------------------- the benchmarks
# The paper's referring-segmentation benchmarks: each a refs file beside a COCO instances.json in
# its own folder (the refer API's layout, and the authors' data/ref_seg where gRefCOCO is grefs/),
# with the splits of the paper's tables. Their images are all COCO train2014.
BENCHMARKS = {"refcoco": ("refs(unc).p", ("val", "testA", "testB")),
              "refcoco+": ("refs(unc).p", ("val", "testA", "testB")),
              "refcocog": ("refs(umd).p", ("val", "test")),
              "grefcoco": ("grefs(unc).json", ("val", "testA", "testB"))}
FOLDER_NAMES = {"grefcoco": ("grefcoco", "grefs")}
IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014", "coco2014/train2014", "coco/train2014", "train2014")


def find_benchmarks(cfg):
    """--benchmark=FOLDER -> [(name, data spec)] for each of --bench_sets found in FOLDER as
    FOLDER/NAME/<refs file> + FOLDER/NAME/instances.json; the images in --bench_images, or the
    first of IMAGE_DIRS that exists in the benchmark's folder or in FOLDER. A benchmark asked for
    by name that is not there is an error; of the default four, the missing ones are skipped."""
    root, names = cfg["benchmark"], [n for n in cfg["bench_sets"].split(",") if n]
    if unknown := [n for n in names if n not in BENCHMARKS]:
        raise UserError(f"--bench_sets: unknown benchmark {unknown[0]!r}; the benchmarks are {', '.join(BENCHMARKS)}")
    if not os.path.isdir(root):
        raise UserError(f"--benchmark={root!r} is not a folder: pass the folder that holds refcoco/, refcoco+/, "
                        f"refcocog/ and grefcoco/")
    found, missing = [], []
    for name in names:
        refs = BENCHMARKS[name][0]
        homes = [os.path.join(root, f) for f in FOLDER_NAMES.get(name, (name,))]
        home = next((h for h in homes if os.path.isfile(os.path.join(h, refs))), None)
        if home is None:
            missing.append(os.path.join(homes[0], refs))
            continue
        images = cfg["bench_images"] or next((os.path.join(b, d) for b in (home, root) for d in IMAGE_DIRS
                                              if os.path.isdir(os.path.join(b, d))), "")
        if not images:
            raise UserError(f"no COCO train2014 image folder for {name} in {home!r} or {root!r} (looked for "
                            f"{', '.join(IMAGE_DIRS)}): pass --bench_images=DIR")
        found.append((name, f"{name}:{os.path.join(home, refs)}:{os.path.join(home, 'instances.json')}:{images}"))
    if missing and (not found or cfg["bench_sets"] != DEFAULTS["bench_sets"]):
        raise UserError(f"--benchmark={root!r}: {missing[0]} not found (a refs file and instances.json in each "
                        f"benchmark's folder; --bench_sets chooses which benchmarks)")
    for m in missing:
        print0(f"skipping {m}: not found")
    return found


@torch.no_grad()
def score_split(model, processor, mask_tok, S, cfg, spec, split, rank, world):
    """One split of one benchmark on this rank's share of its images (image k on rank k % world)
    -> the sums its metrics are made of: [expressions, sum of IoU, I and U over the expressions
    with a target, no-target expressions, no-target expressions answered with no mask]. The
    prediction of an expression is the union of its decoded masks, at the image's own size; no
    target and no mask is IoU 1 (the GRES convention of the authors' gres_eval)."""
    from itertools import islice
    from data import open_dataset
    from data.tasks import REFER_PROMPTS
    from vlm import generate, tokenize
    sums = np.zeros(6)
    scenes = islice(open_dataset(spec, split=split, max_masks=1), cfg["bench_limit"] or None)   # referred masks only
    mine = (s for k, s in enumerate(scenes) if k % world == rank)
    while chunk := list(islice(mine, cfg["eval_batch"])):       # a few images at a time: nothing piles up
        # every expression with the authors' (and our first) referring prompt; the VLM sees each
        # image as it was trained: S x S for our checkpoints, native resolution for a released one
        prompts = [dict(prompt=REFER_PROMPTS[0].format(r["text"]), answer="", img=i, targets=r["targets"])
                   for i, s in enumerate(chunk) for r in s["refs"]]
        images = [resize_image(s["image"], S) if S else s["image"] for s in chunk]
        convs, _ = tokenize([[p] for p in prompts], images, processor, max_len=10 ** 9)
        codes = [read_answer(t)[1] for t in generate(model, processor, convs, images, cfg["max_new_tokens"], cfg["eval_batch"])]
        for i, s in enumerate(chunk):
            ks = [k for k, p in enumerate(prompts) if p["img"] == i]
            masks = decode_masks(mask_tok, s["image"], [c for k in ks for c in codes[k]])   # one call an image
            pos = 0
            for k in ks:
                pred, gt = masks[pos:pos + len(codes[k])].any(0), s["masks"][prompts[k]["targets"]].any(0)
                pos += len(codes[k])
                inter, union = int((pred & gt).sum()), int((pred | gt).sum())
                sums += [1, inter / union if union else 1.0, inter * gt.any(), union * gt.any(), not gt.any(),
                         not (gt.any() or pred.any())]
    return sums


def split_metrics(sums):
    """The sums of score_split (over every rank) -> gIoU (= mIoU), cIoU = sum I / sum U over the
    expressions with a target, N-acc = no-target expressions answered with no mask / all of them."""
    n, total, inter, union, n_none, hits = sums.tolist()
    return dict(expressions=int(n), giou=total / n if n else None, ciou=inter / union if union else None,
                nacc=hits / n_none if n_none else None, no_target=int(n_none))


def tables(results, name):
    """The paper's two tables for one checkpoint: cIoU on RefCOCO / RefCOCO+ / RefCOCOg, and gIoU /
    cIoU / N-acc on gRefCOCO with their mean over the splits, in percent; "-" where a split was
    not evaluated."""
    pct = lambda m, k: "-" if m is None or m[k] is None else f"{100 * m[k]:.1f}"
    ref = [(b, sp) for b in ("refcoco", "refcoco+", "refcocog") for sp in BENCHMARKS[b][1]]
    g = (*BENCHMARKS["grefcoco"][1], "mean")      # the paper's GRES rows are the mean of the three
    return "\n".join([
        "| cIoU | " + " | ".join(f"{b} {sp}" for b, sp in ref) + " |", "|---" * (len(ref) + 1) + "|",
        f"| {name} | " + " | ".join(pct(results.get(f"{b} {sp}"), "ciou") for b, sp in ref) + " |", "",
        "| gRefCOCO | " + " | ".join(f"{sp} {k}" for sp in g for k in ("gIoU", "cIoU", "N-acc")) + " |",
        "|---" * (3 * len(g) + 1) + "|",
        f"| {name} | " + " | ".join(pct(results.get(f"grefcoco {sp}"), k) for sp in g for k in ("giou", "ciou", "nacc")) + " |"])


def benchmark(cfg):
    """python infer.py --benchmark=FOLDER [--ckpt=...]: every split of every benchmark found,
    sharded over the ranks of torchrun; prints the paper's tables and writes them, with the
    expression counts, to --out/benchmark.json."""
    import torch.distributed as dist
    from common import cleanup, init_distributed, write_json
    rank, world, _ = init_distributed(cfg["device"])
    found = find_benchmarks(cfg)
    model, processor, mask_tok, S, ckpt, tok_path = load(cfg)
    print0(f"{ckpt} (tokenizer {tok_path}) on {', '.join(n for n, _ in found)}, {world} rank{'s' * (world > 1)}")
    results, t0 = {}, time.time()
    for name, spec in found:
        for split in BENCHMARKS[name][1]:
            sums = torch.from_numpy(score_split(model, processor, mask_tok, S, cfg, spec, split, rank, world))
            if world > 1:
                sums = sums.to(mask_tok.device)
                dist.all_reduce(sums)
            results[f"{name} {split}"] = m = split_metrics(sums.cpu())
            print0(f"{name} {split}: {m['expressions']} expressions, " + ", ".join(
                f"{k} {m[k]:.4f}" for k in ("giou", "ciou", "nacc") if m[k] is not None) + f" ({time.time() - t0:.0f} s)")
    g = [results[f"grefcoco {sp}"] for sp in BENCHMARKS["grefcoco"][1] if f"grefcoco {sp}" in results]
    if len(g) == len(BENCHMARKS["grefcoco"][1]):      # the paper's GRES row: the mean of the three splits
        results["grefcoco mean"] = {k: None if None in (v := [m[k] for m in g]) else float(np.mean(v))
                                    for k in ("giou", "ciou", "nacc")}
    parts = os.path.normpath(ckpt).split(os.sep)      # a stage's folder is out/sft/model: name it sft/model
    print0(tables(results, "/".join(parts[-2:] if parts[-1] == "model" and len(parts) > 1 else parts[-1:])))
    if is_master():
        write_json(os.path.join(cfg["out"], "benchmark.json"), dict(checkpoint=ckpt, tokenizer_ckpt=tok_path, results=results))
        print(f"-> {os.path.join(cfg['out'], 'benchmark.json')}")
    cleanup()

# ----------------------------------------------------------------------------- main


def parse_args(argv):
    """IMAGE "PROMPT" plus --key=value options, in any order."""
    usage = 'usage: python infer.py IMAGE "PROMPT" [--mask=REGION.png] [--ckpt=DIR] [--out=DIR] [--key=value ...]'
    # a malformed option is reported before the positionals are counted
    cfg, positional = configure(DEFAULTS, PRESETS, argv, doc=usage + "\n\n" + __doc__, positional=True)
    if cfg["benchmark"]:
        if positional:
            raise UserError(f"--benchmark evaluates on the benchmarks' own images and phrases: drop {positional[0]!r}")
        return None, None, cfg
    if len(positional) != 2:
        raise UserError(f"expected an image and a prompt, got {len(positional)} arguments; {usage}")
    image_path, prompt = positional
    if not prompt.strip():
        raise UserError('the prompt is empty: say what to do, e.g. "Please segment the red circle in this image."')
    if "{mask}" in prompt and not cfg["mask"]:
        raise UserError("the prompt has {mask} but no --mask=REGION.png says which region")
    return image_path, prompt.strip(), cfg


def main(argv=None):
    t0 = time.time()
    try:
        image_path, prompt, cfg = parse_args(sys.argv[1:] if argv is None else argv)
        if cfg["benchmark"]:
            return benchmark(cfg)
        # the inputs are checked before anything heavy is loaded: bad input fails in a second
        image = read_image(image_path, cfg["max_pixels"])
        region = read_region(cfg["mask"], image.shape[:2], cfg["max_pixels"]) if cfg["mask"] else None
        model, processor, mask_tok, S, ckpt, tok_path = load(cfg)
        t_load = time.time()
        asked = prompt
        if region is not None:
            # region captioning: the region's two words stand in the prompt where {mask} does
            try:
                words = codes_to_text(mask_tok.encode(image, region[None]).cpu().numpy())
            except ValueError as e:
                raise UserError(f"region mask {cfg['mask']!r}: {e}")
            asked = prompt.replace("{mask}", words) if "{mask}" in prompt else f"{prompt} {words}"
        # The VLM sees the image as it saw every training image: a plain resize to S x S (ours), or
        # the image itself at the processor's native resolution (S = 0: a released model). The
        # tokenizer below sees the original and paints the masks at its own size.
        generated = chat(model, processor, (resize_image(image, S) if S else image).copy(), asked, cfg["max_new_tokens"])
        t_gen = time.time()
        answer, codes, labels, bad = read_answer(generated)
        masks = decode_masks(mask_tok, image, codes)
        t_dec = time.time()
        stem = os.path.splitext(os.path.basename(image_path))[0] or "image"
        record = dict(image=image_path, prompt=prompt, prompt_sent=asked, generated=generated, answer=answer,
                      masks=[dict(mask=i + 1, codes=list(c), label=l, pixels=int(m.sum()))
                             for i, (c, l, m) in enumerate(zip(codes, labels, masks))],
                      malformed_spans=bad, checkpoint=ckpt, tokenizer_ckpt=tok_path,
                      height=image.shape[0], width=image.shape[1])
        files = write_outputs(cfg["out"], stem, image, masks, labels, codes, prompt, record, region)
    except UserError as e:
        die(e)
    print(f"answer: {answer}")
    H, W = image.shape[:2]
    for i, (c, m) in enumerate(zip(codes, masks)):
        level = "" if c[1] >= 0 else ", level 1 only"
        print(f"[mask {i + 1}] codes ({c[0]}, {c[1]}{level}): {int(m.sum())} px, {m.mean():.1%} of the "
              f"{W}x{H} image -> {files[i]}")
    if not codes:
        print("no mask" + (f" ({bad} malformed mask span{'s' * (bad > 1)} in the answer)" if bad else ""))
    elif bad:
        print(f"{bad} malformed mask span{'s' * (bad > 1)} skipped")
    print(f"overlay -> {files[len(codes)]}; words and codes -> {files[-1]}")
    print(f"{time.time() - t0:.1f} s: load {t_load - t0:.1f} s, generate {t_gen - t_load:.1f} s, "
          f"decode {t_dec - t_gen:.1f} s ({ckpt}, tokenizer {tok_path})")


if __name__ == "__main__":
    main()
