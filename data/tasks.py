"""
The Stage-2 / Stage-3 tasks (PAPER.md section 3), built from any scene of data.open_dataset:

    referring / generalized segmentation   "Please segment {phrase} in this image."  -> mask words, or "No target."
    region captioning                      "Describe the region {mask words} in detail."  -> a caption
    grounding (Qwen-VL's own pretraining)  "Where is {phrase} in this image? Answer with its box."
                                           -> <|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
    grounded conversation (GCG)            "Please describe the image and segment ..."
                                           -> text with <|object_ref_start|>phrase<|object_ref_end|><mask words>

A sample is a dict with task, prompt (the user's text), answer (the assistant's text) and what the
evaluation needs (targets, phrase, kind, obj). The target words are always what the Stage-1
encoder says for each ground-truth mask (codes, passed in), so the VLM learns to say exactly the
tokenizer's words. conversations() groups the samples of one image and task into multi-turn
conversations. Everything here is a pure function of the scene and its seed.
"""

import random
import zlib

import numpy as np

from data.shapes import COLORS, SHAPES, SIZES
from samtok import codes_to_text

# A few paraphrases per task (PAPER.md section 3 gives the first of each), so the model learns
# the task, not one string. The choice is a pure function of the scene seed.
REFER_PROMPTS = ("Please segment {} in this image.", "Segment {}.", "Can you segment {} in the image?",
                 "Where is {}? Answer with its mask.", "Give the mask of {}.")
CAPTION_PROMPTS = ("Describe the region {} in detail.", "What is in the region {}?",
                   "Please describe the region {} briefly.")
GROUND_PROMPTS = ("Where is {} in this image? Answer with its box.", "Give the box of {}.",
                  "Locate {} with a bounding box.")
GCG_PROMPTS = ("Please describe the image and segment every object you mention.",
               "Describe this image, with a mask for each object.",
               "What is in this image? Ground each object with its mask.")
NO_TARGET = "No target."
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"   # Qwen's own grounding tokens
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
# the attribute words a region caption of the shapes world is scored on
ATTRS = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}


def scene_seed(scene_id):
    """A scene's integer seed (prompt paraphrases are drawn from it): the shapes world's own seed,
    or a stable hash of a file name."""
    return scene_id if isinstance(scene_id, int) else zlib.crc32(str(scene_id).encode())


def box_text(box, H, W):
    """A box as Qwen2-VL writes one: (x1,y1),(x2,y2) on a 0-1000 grid over the image, in box tokens."""
    x1, y1, x2, y2 = (int(v * 1000 / d) for v, d in zip(box, (W, H, W, H)))
    return f"{BOX_START}({x1},{y1}),({min(x2, 999)},{min(y2, 999)}){BOX_END}"


def scene_samples(seed, scene, codes, tasks):
    """Every sample of one scene for the given tasks. codes (N, 2): the tokenizer's codes of the
    scene's masks."""
    rng = random.Random(seed)
    box = scene["boxes"]
    centre = (box[:, :2] + box[:, 2:]) / 2
    # several targets are written in a fixed order, sorted by box centre (x, then y), so the
    # answer is a function of the image, not of annotation order
    in_order = lambda targets: sorted(targets, key=lambda i: (centre[i, 0], centre[i, 1]))
    out = []
    if "refer" in tasks:
        for ref in scene.get("refs", []):
            targets = in_order(ref["targets"])
            # generalized referring (GRES): zero, one or many targets; "No target." is an answer
            # to learn like any other, and what N-acc measures
            answer = "".join(codes_to_text(codes[i]) for i in targets) if targets else NO_TARGET
            out.append(dict(task="refer", kind=ref["kind"], seed=seed, phrase=ref["text"], targets=targets,
                            prompt=rng.choice(REFER_PROMPTS).format(ref["text"]), answer=answer))
    if "ground" in tasks:
        # phrase -> box in Qwen-VL's own text (what a released Qwen-VL is pretrained to answer, and
        # a config-built one learns here): where the object is, in words the LM can share across
        # objects, before the arbitrary ids of its mask words
        H, W = scene["image"].shape[:2]
        for ref in scene.get("refs", []):
            targets = in_order(ref["targets"])
            answer = ", ".join(f"{REF_START}{ref['text']}{REF_END}{box_text(box[i], H, W)}" for i in targets)
            out.append(dict(task="ground", seed=seed, phrase=ref["text"], targets=targets,
                            prompt=rng.choice(GROUND_PROMPTS).format(ref["text"]), answer=answer or NO_TARGET))
    if "caption" in tasks:
        # region captioning turns the words around: the mask is in the prompt, the text is the answer
        for i, caption in enumerate(scene.get("captions", [])):
            out.append(dict(task="caption", seed=seed, obj=scene["objects"][i], answer=caption,
                            prompt=rng.choice(CAPTION_PROMPTS).format(codes_to_text(codes[i]))))
    if "gcg" in tasks and scene.get("grounded", {}).get("text"):     # COCO / SA-1B scenes have no grounded text
        # grounded conversation: each grounded phrase wrapped in object_ref tokens, then its mask words
        g, parts, last = scene["grounded"], [], 0
        for a, b, i in g["spans"]:
            parts += [g["text"][last:a], REF_START, g["text"][a:b], REF_END, codes_to_text(codes[i])]
            last = b
        out.append(dict(task="gcg", seed=seed, prompt=rng.choice(GCG_PROMPTS), answer="".join(parts) + g["text"][last:]))
    return out


def absent_refs(seed, scene, n):
    """n more no-target phrases for a training scene of the shapes world, drawn as the world draws
    its one a scene (data.shapes.absent_attrs), none repeating a phrase the scene already has."""
    from data.shapes import absent_attrs, ref_text
    objs = scene["objects"]
    if not objs or not all("color" in o and "shape" in o for o in objs):
        return []
    rng, out = np.random.default_rng(seed + 1), []
    seen = {r["text"] for r in scene["refs"]}
    for _ in range(20 * n):             # bounded: a scene could in principle leave too few unseen phrases
        if len(out) == n or (attrs := absent_attrs(rng, objs)) is None:
            break
        if (text := ref_text(attrs)) not in seen:
            seen.add(text)
            out.append({"text": text, "targets": [], "kind": "none", "attrs": attrs})
    return out


def text_corpus(scenes, tasks=("refer", "caption", "gcg")):
    """The text of the tasks (what the config-built BPE of tiny_vlm.py learns from): the world's
    phrases, captions, grounded texts and the prompt templates (mask words excluded: they are
    added to the vocabulary whole)."""
    fixed = ["system\n", "user\n", "assistant\n", NO_TARGET, *GCG_PROMPTS, *[p.format("") for p in CAPTION_PROMPTS]]
    boxes = []
    if "ground" in tasks:      # the grounding prompts and every referred object's box, as the answers write them
        fixed += [p.format("") for p in GROUND_PROMPTS]
        boxes = [box_text(s["boxes"][i], *s["image"].shape[:2]) for s in scenes for r in s.get("refs", []) for i in r["targets"]]
    texts = [p.format(r["text"]) for s in scenes for r in s.get("refs", []) for p in REFER_PROMPTS]
    # grounded phrases also stand alone (after <|object_ref_start|>, without their leading space)
    grounded = [s.get("grounded", {"text": "", "spans": []}) for s in scenes]
    phrases = [g["text"][a:b] for g in grounded for a, b, _ in g["spans"]]
    captions = [c for s in scenes for c in s.get("captions", [])]
    return fixed * 50 + texts + phrases + captions + [g["text"] for g in grounded] + boxes


def conversations(samples, turns, seed, repeat=None):
    """The samples of each image and task in random order, cut into conversations of up to
    `turns` turns (LLaVA-style multi-turn data: the image and the prompt overhead are paid once
    for several answers). No answer may be copied from the context: a conversation holds one
    task (a region caption's prompt or a grounded description holds the very mask words a later
    referring answer needs), and its referring turns have disjoint targets (two phrases for one
    object, "the red circle" then "the circle", would make the second answer a copy).
    repeat: {task: k} deals a task's samples k times, each time in a new order and grouping, so
    that task takes a larger share of an epoch (the mixture's weights; 1 for a task not named)."""
    groups = {}
    for s in samples:
        groups.setdefault((s["img"], s["task"]), []).append(s)
    rng = random.Random(seed)
    convs = []
    for key in sorted(groups):
        for _ in range((repeat or {}).get(key[1], 1)):
            group = list(groups[key])
            rng.shuffle(group)
            open_convs = []             # [turns, their targets]: each sample joins the first that fits
            for s in group:
                t = set(s.get("targets", ()))
                home = next((c for c in open_convs if len(c[0]) < turns and not t & c[1]), None)
                if home is None:
                    open_convs.append(home := [[], set()])
                home[0].append(s)
                home[1] |= t
            convs += [c for c, _ in open_convs]
    return convs
