"""
Stage 1's samples: every (image, mask) pair of a split at the tokenizer's resolution.

The paper trains the tokenizer on single masks (209M of them) with the image encoder frozen; here
a batch is drawn the way SAM trains, a few images and (up to masks_per_image of) their masks, so
the image-level work runs once per image. A MaskSet holds scenes as flat tensors: the mask at
S x S, its mask prompt at 4x the feature grid (what SAM2's mask_downscaling reads), its tight box
in resized pixels (the two corner points of the prompt), and the scene it belongs to. The shapes
world keeps its whole train split in one; streamed (data/stream.py), the workers build one per
batch (MaskBatches), and the evaluations read a split a chunk of scenes at a time (mask_sets).
"""

from collections import Counter
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, resize_image
from data import open_dataset
from samtok import boxes_of


def data_spec(cfg):
    """--data as data.open_dataset reads it: the shapes world drawn at the model's resolution (up to
    512 px); enough masks an image for masks_per_image draws, far fewer than SA-1B's ~100."""
    spec = f"shapes:{min(cfg['image_size'], 512)}" if cfg["data"] == "shapes" else cfg["data"]
    return spec, cfg["masks_per_image"] * 4


def split_scenes(cfg, split):
    """The first n scenes of a split of --data (n = n_train / n_val / n_test), one at a time, read
    through data.open_dataset (see data/__init__.py). Formats without splits of their own are
    split 90/5/5 by a hash of the image name."""
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    spec, cap = data_spec(cfg)
    return islice(open_dataset(spec, Counter(), split=split, max_masks=cap), n)


def load_split(cfg, split):
    """split_scenes as a list (in memory: the tiny preset's shapes world)."""
    scenes = list(split_scenes(cfg, split))
    if not scenes:
        raise UserError(f"{cfg['data']} has no usable samples for the {split} split")
    return scenes


def mask_sets(cfg, split, chunk=32):
    """split_scenes as MaskSets of up to `chunk` scenes: an evaluation holds one chunk at a time."""
    scenes, any_ = split_scenes(cfg, split), False
    while part := list(islice(scenes, chunk)):
        any_ = True
        yield MaskSet(part, cfg["image_size"])
    if not any_:
        raise UserError(f"{cfg['data']} has no usable samples for the {split} split")


class MaskSet:
    """Every (scene, mask) pair of a split as flat tensors at the model's resolution: the mask
    (M, S, S), its mask prompt at 4x the feature grid (M, 1, 4g, 4g), its box in resized
    pixels (M, 4), and the index of its scene (M,)."""

    def __init__(self, scenes, S):
        g = S // 16
        self.images = np.stack([resize_image(s["image"], S) for s in scenes])       # (I, S, S, 3)
        masks, scene_idx, prompts, boxes = [], [], [], []
        for i, s in enumerate(scenes):
            m = torch.as_tensor(np.asarray(s["masks"])).float()[:, None]           # (n, 1, H, W)
            H, W = m.shape[-2:]
            prompts.append(F.interpolate(m, size=(4 * g, 4 * g), mode="bilinear", antialias=True))
            boxes.append(boxes_of(s["masks"]) * torch.tensor([S / W, S / H, S / W, S / H]))
            masks.append(F.interpolate(m, size=(S, S), mode="nearest")[:, 0] > 0.5)
            scene_idx += [i] * len(m)
        self.masks, self.prompts = torch.cat(masks), torch.cat(prompts)
        self.boxes, self.scene = torch.cat(boxes), torch.tensor(scene_idx)
        self.area = self.masks.flatten(1).float().mean(1)                         # fraction of image
        counts = torch.bincount(self.scene, minlength=len(scenes))
        self.start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # scene i: start[i]:start[i+1]

    def sample(self, n, cap, generator):
        """A training batch the way SAM trains: n random images and all (or `cap` random ones) of
        their masks; the image-level work then runs once per image, not once per mask.
        -> (scenes (n,), mask indices (M,), each mask's position in scenes (M,))."""
        scenes = torch.randint(len(self.images), (n,), generator=generator)
        idx = [torch.arange(self.start[s], self.start[s + 1]) for s in scenes.tolist()]
        if cap:
            idx = [ix[torch.randperm(len(ix), generator=generator)[:cap]] for ix in idx]
        pos = torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(idx)])
        return scenes, torch.cat(idx), pos

    def gather(self, scenes, idx, pos):
        """The batch of sample(): the images (n, S, S, 3) uint8 and, per mask, its target, prompt,
        box and image position; scenes (the indices in this set) for a feature cache."""
        return dict(scenes=scenes, images=torch.from_numpy(self.images[scenes.numpy()]), masks=self.masks[idx],
                    prompts=self.prompts[idx], boxes=self.boxes[idx], img_idx=pos)

    def __len__(self):
        return len(self.masks)


class MaskBatches:
    """data.stream's make_batches for Stage 1: a pool of scenes -> batches of n images in a
    random order, each with all (or `cap` random ones) of its masks, at S x S; runs in the
    DataLoader workers, so decoding and resizing stay off the training process."""

    def __init__(self, n, S, cap):
        self.n, self.S, self.cap = n, S, cap

    def __call__(self, scenes, rng):
        order, out = rng.permutation(len(scenes)), []
        for a in range(0, len(order), self.n):
            ms = MaskSet([scenes[i] for i in order[a:a + self.n]], self.S)
            idx = [torch.arange(ms.start[s], ms.start[s + 1]) for s in range(len(ms.images))]
            if self.cap:
                idx = [ix[torch.from_numpy(rng.permutation(len(ix))[:self.cap])] for ix in idx]
            pos = torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(idx)])
            out.append(ms.gather(torch.arange(len(ms.images)), torch.cat(idx), pos))
        return out
