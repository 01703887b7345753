"""
SAMTok, the model: any region mask of an image -> two discrete codes -> the mask again.

"We represent any mask with two words." (PAPER.md section 1)

    image --SAM2 image encoder--> features (g x g, g = S / 16) ----------------------------+
    mask  --SAM2 prompt encoder--> dense prompt + box corners --+                          |
                                                                 v                          v
            [learned query, corner 1, corner 2, pad] --new two-way transformer--> z (D,)   |
                                                                 |                          |
                              two-level residual VQ (quantizer.py): codes (c1, c2), e1 + e2 |
                                                                 v                          v
                          SAM2 mask decoder, prompted with the single token e1 + e2 --> mask logits

An LLM then says a mask as <|mt_start|><|mt_00xx|><|mt_0yyy|><|mt_end|> (masks as words, PAPER.md
section 2: codes_to_text / text_to_codes below). The module names are SAM2Base's, so an official
SAM2.1 checkpoint loads by key; the authors' released tokenizer converts into this model with one
renaming table (convert_released, at the end of the file).

This file is a library: tokenizer.py trains it; sft.py, grpo.py and infer.py load it with
load_tokenizer(path) and use encode(image, masks) -> codes and decode(image, codes) -> masks.
"""

import os
import re
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, read_checkpoint
from quantizer import ResidualVQ

# ----------------------------------------------------------------------------- masks as words
MASK_START, MASK_END = "<|mt_start|>", "<|mt_end|>"
K = 256  # codes per level: level-1 code c -> <|mt_{c:04d}|>, level-2 code c -> <|mt_{256+c:04d}|>


def mask_tokens():
    """The 514 new words, in vocabulary order."""
    return [MASK_START] + [f"<|mt_{i:04d}|>" for i in range(2 * K)] + [MASK_END]


def codes_to_text(codes):
    """(2,) or (N, 2) codes -> the mask words, one 4-token group per mask (a level coded -1,
    "missing", writes no word: a level-1-only mask is 3 tokens)."""
    codes = np.asarray(codes).reshape(-1, 2)
    if ((codes < -1) | (codes >= K)).any():
        raise ValueError(f"codes must be in [-1, {K - 1}]")
    word = lambda c, level: f"<|mt_{level * K + int(c):04d}|>" if c >= 0 else ""
    return "".join(f"{MASK_START}{word(a, 0)}{word(b, 1)}{MASK_END}" for a, b in codes)


_WORD = re.compile(r"<\|mt_(start|end|\d{4})\|>")


def text_to_codes(text):
    """Tolerant parse of generated text -> list of (c1, c2), one per mask span; never raises.
    A span opens at <|mt_start|> (or at a code outside any span) and closes at <|mt_end|> or
    the next <|mt_start|>. Repairs (PAPER.md section 2): 3+ codes keep the first two; one code
    gives level 2 = -1; a level-2 slot holding a level-1 id, or any id out of range, is -1. A run
    of codes with no delimiters at all and an even count of 4 or more is read as consecutive
    pairs, as the authors' demo reads it (<|mt_0003|><|mt_0300|><|mt_0005|><|mt_0301|>: 2 masks)."""
    spans, cur, bare = [], None, False          # bare: the current span opened without <|mt_start|>
    for m in _WORD.finditer(text or ""):
        w = m.group(1)
        if w == "start":
            if cur:
                spans.append((cur, bare))
            cur, bare = [], False
        elif w == "end":
            if cur:
                spans.append((cur, False))     # closed by <|mt_end|>: a delimited span
            cur = None
        else:
            if cur is None:
                cur, bare = [], True
            cur.append(int(w))
    if cur:
        spans.append((cur, bare))
    pairs = lambda ids: [ids[i:i + 2] for i in range(0, len(ids), 2)]
    spans = [part for ids, b in spans for part in (pairs(ids) if b and len(ids) >= 4 and len(ids) % 2 == 0 else [ids])]
    out = []
    for ids in spans:
        a, b = ids[0], ids[1] if len(ids) > 1 else -1
        c1 = a if 0 <= a < K else -1
        c2 = b - K if K <= b < 2 * K else -1
        out.append((c1, c2))
    return out


# ----------------------------------------------------------------------------- the model
@dataclass
class SAMTokConfig:
    sam2_config: str            # the sam2 package's YAML for the image encoder (Hiera trunk + FPN neck)
    sam2_overrides: str         # dotlist overrides of that YAML (the tiny preset's narrow Hiera)
    image_size: int             # S: images are resized to S x S (paper: 1024, aspect ratio not kept)
    d_model: int                # D: SAM2's prompt / decoder width = the latent z = the code vectors (paper: 256)
    mlp_dim: int                # MLP width of the two-way transformers (paper: 2048)
    levels: int                 # residual VQ levels (paper: 2)
    codebook_size: int          # codes a level (paper: 256)
    ema_decay: float            # EMA codebooks (paper: 0.99)
    commitment_weight: float    # weight of the cumulative commitment loss (released config: 1.0)
    dead_threshold: float       # restart codes whose EMA cluster size falls below this (paper: 1.0)
    mask_threshold: float       # decode: logit > threshold (the released scripts use 0.5)

    @classmethod
    def from_dict(cls, d):
        """The model's part of a larger dict (a training config, a checkpoint's "config")."""
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise UserError(f"the tokenizer config lacks {', '.join(missing)}: not a SAMTok checkpoint?")
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    to_dict = asdict


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_image_encoder(config):
    """SAM2's image encoder (Hiera trunk + FPN neck) from the sam2 package's own YAML config,
    with dotlist overrides for the tiny widths. The neck's channel list follows the trunk."""
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    path = config.sam2_config
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(sam2.__file__), path)
    if not os.path.exists(path):
        raise UserError(f"SAM2 config {config.sam2_config} not found (looked in the sam2 package)")
    enc = OmegaConf.load(path).model.image_encoder
    over = re.findall(r"[\w.]+=(?:\[[^\]]*\]|[^,]+)", config.sam2_overrides)  # commas inside [...]
    enc = OmegaConf.merge(enc, OmegaConf.from_dotlist(over))
    e, n = enc.trunk.embed_dim, len(enc.trunk.stages)
    enc.neck.backbone_channel_list = [int(e * 2 ** i) for i in reversed(range(n))]
    enc.neck.d_model = config.d_model
    return instantiate(enc)


class SAMTok(nn.Module):
    """The mask tokenizer. config: a SAMTokConfig, or a dict holding its fields."""

    def __init__(self, config):
        super().__init__()
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
        self.config = config if isinstance(config, SAMTokConfig) else SAMTokConfig.from_dict(config)
        D, S = self.config.d_model, self.config.image_size
        self.grid = S // 16  # SAM2 works on stride-16 features: 64x64 at 1024 px, 8x8 at 128 px
        # SAM2, as in SAM2Base: image encoder, prompt encoder, mask decoder (multimask, high-res features)
        self.image_encoder = build_image_encoder(self.config)
        self.sam_prompt_encoder = PromptEncoder(embed_dim=D, image_embedding_size=(self.grid, self.grid),
                                                input_image_size=(S, S), mask_in_chans=16)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3, transformer_dim=D, iou_head_depth=3, iou_head_hidden_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=self.config.mlp_dim, num_heads=8),
            use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
            pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True)
        # single-frame path of SAM2: a learned "no memory" embedding is added to the image features
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, D))
        # The NEW mask encoder (not in SAM2): a two-way transformer (depth 2) whose tokens are
        # [one learned query, box corner 1, box corner 2, pad]; the query's output is z.
        self.mask_encoder = TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=self.config.mlp_dim, num_heads=8)
        self.query = nn.Embedding(1, D)
        # the two-level residual VQ: codes (c1, c2) and the vector e1 + e2 the decoder sees
        c = self.config
        self.rvq = ResidualVQ(levels=c.levels, codebook_size=c.codebook_size, dim=D, decay=c.ema_decay,
                              commitment_weight=c.commitment_weight, dead_threshold=c.dead_threshold)

    @property
    def device(self):
        return self.query.weight.device

    # ---- the image side: pixels -> SAM2 features, computed once per image
    def preprocess(self, images):
        """uint8 (B, H, W, 3) -> (B, 3, S, S): plain resize to S x S, /255, ImageNet mean/std."""
        # a read-only array (an image decoded by PIL) is copied: torch will not wrap one
        images = images if not isinstance(images, np.ndarray) or images.flags.writeable else images.copy()
        x = torch.as_tensor(images, device=self.device).permute(0, 3, 1, 2).float() / 255
        S = self.config.image_size
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        return (x - IMAGENET_MEAN.to(x.device)) / IMAGENET_STD.to(x.device)

    def image_features(self, x):
        """(B, 3, S, S) -> the raw FPN levels [stride 4, stride 8, stride 16]: what the frozen
        encoder produces, and what tokenizer.py caches."""
        return self.image_encoder(x)["backbone_fpn"]

    def image_embeddings(self, fpn):
        """FPN levels -> what both transformers read: the stride-16 embedding (B, D, g, g) with
        no_mem_embed added (SAM2's single-frame path), and the decoder's high-res features
        [s0 (stride 4), s1 (stride 8)] through its own 1x1 convolutions."""
        dec = self.sam_mask_decoder
        embed = fpn[2] + self.no_mem_embed.view(1, -1, 1, 1)
        return embed, [dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1])]

    # ---- the encoder: mask + box -> z
    def box_points(self, boxes):
        """xyxy boxes (B, 4) in resized pixels -> SAM2 corner points with labels 2 and 3."""
        return boxes.view(-1, 2, 2), torch.tensor([[2, 3]], device=boxes.device).expand(len(boxes), 2)

    def encode_latent(self, embed, mask_prompt, boxes):
        """The mask encoder: (B, D, g, g) features, (B, 1, 4g, 4g) mask, (B, 4) box -> z (B, D).
        The mask goes through SAM2's mask_downscaling as a dense prompt added to the features;
        the box as its two corner points (plus SAM2's padding point) after the learned query."""
        sparse, dense = self.sam_prompt_encoder(points=self.box_points(boxes), boxes=None, masks=mask_prompt)
        tokens = torch.cat([self.query.weight.expand(len(boxes), 1, -1), sparse], 1)  # (B, 4, D)
        pos = self.sam_prompt_encoder.get_dense_pe().expand(len(boxes), -1, -1, -1)
        hs, _ = self.mask_encoder(embed + dense, pos, tokens)   # final token->image attention + LayerNorm inside
        return hs[:, 0]                                          # the query's output is z

    # ---- the decoder: code vector -> mask logits
    def decode_logits(self, embed, hires, code):
        """SAM2's mask decoder prompted with the code vector (B, D) alone: it is appended to the
        sparse prompt tokens after two padding embeddings (no points, no box), and the dense
        prompt is no_mask_embed. -> logits (B, 3, 4g, 4g) (multimask), predicted IoU (B, 3)."""
        pe, B = self.sam_prompt_encoder, embed.shape[0]
        pad = pe.not_a_point_embed.weight.expand(B, 2, -1)
        sparse = torch.cat([pad, code[:, None]], 1)                                  # (B, 3, D)
        dense = pe.no_mask_embed.weight.view(1, -1, 1, 1).expand(B, -1, self.grid, self.grid)
        return self._mask_decoder(embed, hires, sparse, dense)

    def _mask_decoder(self, embed, hires, sparse, dense):
        logits, iou, _, _ = self.sam_mask_decoder(embed, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                                  multimask_output=True, repeat_image=False, high_res_features=hires)
        return logits, iou

    def forward(self, fpn, mask_prompt, boxes, img_idx=None, quantize=True):
        """One training forward of the tokenizer (what DDP wraps): features of the images, then
        per mask its prompt, box and (img_idx) image -> logits, predicted IoU, commitment loss,
        codes. quantize=False runs the unquantized latent (tokenizer.py's warm-up)."""
        embed, hires = self.image_embeddings(fpn)
        if img_idx is not None:  # per image above, per mask below
            embed, hires = embed[img_idx], [h[img_idx] for h in hires]
        z = self.encode_latent(embed, mask_prompt, boxes)
        commit, codes = z.new_zeros(()), None
        if quantize:
            z, codes, commit = self.rvq(z)                       # straight-through z_q, (B, L), scalar
        logits, iou = self.decode_logits(embed, hires, z)
        return logits, iou, commit, codes

    # ---- the public API: numpy in, numpy out, at the image's own size
    def _checked(self, image, masks):
        """Checks and normalises an (image, masks) pair; see encode()."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)          # grayscale -> RGB
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        if image.dtype != np.uint8:  # 16-bit: /257 maps 0..65535 onto 0..255; floats in [0, 1]: x255
            scale = 1 / 257 if image.max() > 255 else (255.0 if image.dtype.kind == "f" and image.max() <= 1 else 1.0)
            image = np.clip(np.round(image * scale), 0, 255).astype(np.uint8)
        image = image[..., :3]                                  # RGBA: alpha dropped
        if masks is None:
            return image, None
        masks = np.asarray(masks)
        masks = masks[None] if masks.ndim == 2 else masks
        if masks.ndim != 3:
            raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {masks.shape}")
        if masks.shape[1:] != image.shape[:2]:
            raise ValueError(f"masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
                             f"{image.shape[0]}x{image.shape[1]}: resize the masks to the image first")
        masks = masks > 0.5 if masks.dtype.kind == "f" else masks > 0
        empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(1))
        if len(empty):
            raise ValueError(f"mask {int(empty[0])} is empty: an empty region has no tokens")
        return image, masks

    @torch.no_grad()
    def encode(self, image, masks):
        """image (H, W, 3) uint8 (grayscale, RGBA and 16-bit are converted), masks (N, H, W) of
        the same H, W (bool; integers: nonzero; floats: > 0.5) -> codes (N, 2) long.
        ValueError for an empty mask, a size mismatch or wrong shapes."""
        return self.encode_many([(image, masks)])[0]

    @torch.no_grad()
    def encode_many(self, pairs):
        """encode() of several (image, masks) pairs in one batch: the images (each of its own size)
        go through the image encoder together, then every mask of every image through the mask
        encoder together: the same codes as one encode() each, in far fewer forwards.
        -> a list of codes (N_i, 2), one per pair."""
        pairs = [self._checked(image, masks) for image, masks in pairs]
        S, g = self.config.image_size, self.grid
        x = torch.cat([self.preprocess(image[None]) for image, _ in pairs])          # (B, 3, S, S)
        embed, _ = self.image_embeddings(self.image_features(x))
        owner = torch.tensor([i for i, (_, masks) in enumerate(pairs) for _ in masks], device=self.device)
        prompts, boxes = [], []
        for image, masks in pairs:
            H, W = image.shape[:2]
            m = torch.as_tensor(masks, device=self.device).float()[:, None]        # (N, 1, H, W)
            prompts.append(F.interpolate(m, size=(4 * g, 4 * g), mode="bilinear", antialias=True, align_corners=False))
            boxes.append(boxes_of(masks) * torch.tensor([S / W, S / H, S / W, S / H]))
        z = self.encode_latent(embed[owner], torch.cat(prompts), torch.cat(boxes).to(self.device))
        return list(self.rvq.quantize(z)[0].split([len(masks) for _, masks in pairs]))

    @torch.no_grad()
    def decode(self, image, codes):
        """codes (N, 2) (-1 = level missing) -> masks (N, H, W) bool at the image's size: the
        best of the 3 outputs by predicted IoU, upsampled bilinearly, logit > mask_threshold."""
        image, _ = self._checked(image, None)
        codes = torch.as_tensor(np.asarray(codes), device=self.device).long().view(-1, self.config.levels)
        if len(codes) == 0:
            return np.zeros((0, *image.shape[:2]), bool)
        embed, hires = self.image_embeddings(self.image_features(self.preprocess(image[None])))
        n = len(codes)
        logits, iou = self.decode_logits(embed.expand(n, -1, -1, -1), [h.expand(n, -1, -1, -1) for h in hires],
                                         self.rvq.embed(codes))
        best = logits[torch.arange(n), iou.argmax(1)][:, None]      # best of 3 by predicted IoU
        up = F.interpolate(best, size=image.shape[:2], mode="bilinear", align_corners=False)
        return (up[:, 0] > self.config.mask_threshold).cpu().numpy()


    # ---- SAM2 as SAM2: a box prompt -> mask (tokenizer.py pretrains the tiny preset's SAM2 with it)
    def box_logits(self, embed, hires, boxes, dense_box=None):
        """SAM2 prompted with boxes (B, 4): the box as its two corner points, and for the samples
        where dense_box (B,) is True also drawn as a dense mask prompt. The dense box tells the
        decoder where to look from step one, so pretraining spends its steps on what an object is;
        the corner-only samples keep teaching the sparse-token path, the one the code token uses."""
        pe = self.sam_prompt_encoder
        sparse, dense = pe(points=self.box_points(boxes), boxes=None, masks=None)
        if dense_box is not None and dense_box.any():
            g4, S = 4 * self.grid, self.config.image_size
            c = (torch.arange(g4, device=boxes.device) + 0.5) * S / g4               # cell centres
            inx = (c[None] >= boxes[:, 0:1]) & (c[None] <= boxes[:, 2:3])             # (B, 4g)
            iny = (c[None] >= boxes[:, 1:2]) & (c[None] <= boxes[:, 3:4])
            drawn = pe.mask_downscaling((iny[:, :, None] & inx[:, None, :]).float()[:, None])
            dense = torch.where(dense_box.view(-1, 1, 1, 1), drawn, dense.expand_as(drawn))
        return self._mask_decoder(embed, hires, sparse, dense)


def boxes_of(masks):
    """(N, H, W) bool -> (N, 4) float xyxy tight boxes (x2, y2 exclusive), as torch."""
    from data.jsonl import boxes_from_masks  # the one definition of a mask's tight box
    return torch.from_numpy(boxes_from_masks(np.asarray(masks)))


# ----------------------------------------------------------------------------- loading
def released_files(folder):
    """A folder laid out as the authors release their models -> (its mask_tokenizer_*.pth, the
    sam2.1_hiera_*.pt beside it or ""), or None when it holds no released tokenizer."""
    if not os.path.isdir(folder):
        return None
    names = sorted(os.listdir(folder))
    toks = [n for n in names if n.startswith("mask_tokenizer_") and n.endswith(".pth")]
    sam2 = [n for n in names if n.startswith("sam2.1_hiera_") and n.endswith(".pt")]
    if not toks:
        return None
    for found, what in ((toks, "--tokenizer_ckpt=FILE"), (sam2, "--sam2_ckpt=FILE")):
        if len(found) > 1:
            raise UserError(f"{folder} holds {len(found)} files {', '.join(found)}: say which one with {what}")
    return os.path.join(folder, toks[0]), os.path.join(folder, sam2[0]) if sam2 else ""


def load_tokenizer(path, device="cpu", sam2_ckpt=""):
    """A trained tokenizer, ready to encode / decode: a checkpoint of tokenizer.py (ckpt.pt or
    its folder: weights + the config that built them), or the authors' released
    mask_tokenizer_256x2.pth (or a released model's folder holding it), converted on the fly
    (convert_released); its image encoder comes from sam2_ckpt (default: the sam2.1_hiera_*.pt
    beside it) if the file has none."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "ckpt.pt")) and (released := released_files(path)):
        path, sam2_ckpt = released[0], sam2_ckpt or released[1]
    elif os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"no tokenizer checkpoint at {path}: run `python tokenizer.py` first (or pass --tokenizer_ckpt=PATH)")
    ck = read_checkpoint(path)
    if isinstance(ck, dict) and ck.get("stage") == "tokenizer":
        model = SAMTok(ck["config"])
        model.load_state_dict(ck["model"])
    elif isinstance(ck, dict) and "quantizer.codebooks.0.weight" in ck:
        # SAM2's image encoder (~0.9 GB at Hiera-L) is read only when the file itself has none
        has_encoder = any(k.startswith(RELEASED_PREFIX + "image_encoder.") for k in ck)
        if not has_encoder and not sam2_ckpt:
            raise UserError(f"{path} has no SAM2 image encoder and no sam2.1_hiera_*.pt lies beside it: put the SAM2.1 "
                            f"checkpoint there or pass --sam2_ckpt=sam2.1_hiera_large.pt")
        config, sd = convert_released(ck, path, read_state_dict(sam2_ckpt) if sam2_ckpt and not has_encoder else None)
        model = SAMTok(config)
        load_checked(model, sd, path, None)
    else:
        raise UserError(f"{path} is not a tokenizer checkpoint (neither tokenizer.py's nor a released mask_tokenizer_*.pth)")
    model.checkpoint = path         # the file it came from: the key of the Stage-2 codes cache
    return model.to(device).eval()


def read_state_dict(path):
    """The state dict of a checkpoint file: its "model" entry (the official sam2.1_hiera_*.pt
    layout, and ours) or the file itself (a released tokenizer)."""
    ck = read_checkpoint(path)
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path} holds no state dict (a dict of tensor names to tensors)")
    return sd


SAM2_PARTS = ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "no_mem_embed")
HIERA = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}   # (embed_dim, blocks) -> SAM2.1 size


def hiera_size(sd):
    """Which SAM2.1 Hiera a state dict holds ("t", "s", "b+", "l"), from the trunk's width and depth."""
    w = sd.get("image_encoder.trunk.patch_embed.proj.weight")
    blocks = {k.split(".")[3] for k in sd if k.startswith("image_encoder.trunk.blocks.")}
    return HIERA.get((w.shape[0], len(blocks))) if w is not None else None


def load_checked(model, sd, path, parts):
    """Load every key of model (of the given top-level parts; None = all) from sd, or refuse
    before anything is loaded, naming the file and the first missing / mismatched keys."""
    ours = {k: v for k, v in model.state_dict().items() if parts is None or k.split(".")[0] in parts}
    missing = [k for k in ours if k not in sd]
    bad = [f"{k} {tuple(sd[k].shape)} in the file, {tuple(ours[k].shape)} here" for k in ours
           if k in sd and sd[k].shape != ours[k].shape]
    extra = [k for k in sd if parts is None and k not in ours]
    if missing or bad or extra:
        size = hiera_size(sd) if parts else None           # a SAM2 file: say which options would fit it
        hint = (f" The file holds SAM2.1 Hiera-{size}: --sam2_config=configs/sam2.1/sam2.1_hiera_{size}.yaml "
                f"--sam2_overrides= --d_model=256 --mlp_dim=2048" + (" (= --preset=paper)" if size == "l" else "")) if size else ""
        what = [f"{len(x)} {name} (first: {', '.join(x[:2])})" for x, name in
                ((missing, "keys missing"), (bad, "of another shape"), (extra, "unexpected keys")) if x]
        raise UserError(f"{path} does not fit this model ({model.config.sam2_config}, d_model {model.config.d_model}): "
                        f"{'; '.join(what)}; nothing was loaded.{hint}")
    model.load_state_dict({k: sd[k].to(ours[k].dtype) for k in ours}, strict=False)


# ----------------------------------------------------------------------------- foreign weights
# SAM2.1's official checkpoints ({"model": SAM2Base state dict}) load by key into the SAM2 parts.
# The authors' released tokenizer is this model with other names: one renaming table.
RELEASED_PREFIX = "model.sam2_model."
VIDEO_ONLY = ("memory_attention", "memory_encoder", "maskmem_tpos_enc", "no_mem_pos_enc", "obj_ptr_proj",
              "obj_ptr_tpos_proj", "mask_downsample", "no_obj_ptr", "no_obj_embed_spatial")


def load_sam2_checkpoint(model, path):
    """Load an official sam2.1_hiera_*.pt into the SAM2 parts, all or nothing. The file's video
    parts (memory attention / encoder, object pointers) are not used on single images. A
    released SAMTok file (SAM2 under "model.sam2_model.") works too."""
    sd = read_state_dict(path)
    load_checked(model, {k.removeprefix(RELEASED_PREFIX): v for k, v in sd.items()}, path, SAM2_PARTS)


def convert_released(sd, path, sam2_sd=None):
    """The authors' released tokenizer (mask_tokenizer_256x2.pth, the state dict of VQ_SAM2 in
    bytedance/Sa2VA projects/samtok) -> (SAMTokConfig, our state dict). Their model is ours, renamed:
        model.sam2_model.{image_encoder, sam_prompt_encoder, sam_mask_decoder, no_mem_embed}.*  same names
        model.sam2_model.sam_mask_encoder.transformer.*        -> mask_encoder.* (2-layer two-way transformer)
        model.sam2_model.sam_mask_encoder.mask_tokens.weight   -> query.weight (1, 256)
        quantizer.codebooks.{l}.weight (257, 256)              -> rvq.codebook[l] (row 256 = padding_idx, dropped)
        quantizer.codebooks.{l}.cluster_size_ema / embed_ema   -> rvq.ema_count[l] / rvq.ema_sum[l]
    Dropped: SAM2's video parts (VIDEO_ONLY), unused on single images. Refused: more than one
    mask token (their MASK_TOKENIZER_NUM_MASK_TOKEN > 1 merges several query outputs through
    extra MLPs, concate_mask_embeds / deconcate_quant_embed; ours encodes a mask with one query)
    and any key this list does not name. The SAM2 size is read off the weights."""
    n_query = sd.get(RELEASED_PREFIX + "sam_mask_encoder.mask_tokens.weight", torch.zeros(1, 1)).shape[0]
    if n_query != 1 or any(k.startswith(("concate_mask_embeds", "deconcate_quant_embed")) for k in sd):
        raise UserError(f"{path} encodes a mask with {n_query} query tokens merged by an MLP "
                        "(concate_mask_embeds); our SAMTok has one query token, so this model cannot be converted")
    ours, books = {}, {}
    for k, v in sd.items():
        v = v.float()                                       # released weights may be bf16
        if k.startswith("quantizer.codebooks."):
            level, name = k.split(".")[2:4]
            books.setdefault(int(level), {})[name] = v
            continue
        name = k.removeprefix(RELEASED_PREFIX)
        if k == name or name.split(".")[0] not in SAM2_PARTS + VIDEO_ONLY + ("sam_mask_encoder",):
            raise UserError(f"{path}: key {k} has no counterpart in SAMTok (not a released mask_tokenizer_*.pth?)")
        if name.startswith("sam_mask_encoder.transformer."):
            name = "mask_encoder." + name.removeprefix("sam_mask_encoder.transformer.")
        elif name == "sam_mask_encoder.mask_tokens.weight":
            name = "query.weight"
        if name.split(".")[0] not in VIDEO_ONLY:
            ours[name] = v
    if sorted(books) != list(range(len(books))) or any("weight" not in b for b in books.values()):
        raise UserError(f"{path}: codebooks {sorted(books)} are incomplete (each level needs quantizer.codebooks.L.weight)")
    n_codes = books[0]["weight"].shape[0] - 1
    ours["rvq.codebook"] = torch.stack([b["weight"][:n_codes] for b in books.values()])
    ours["rvq.ema_count"] = torch.stack([b.get("cluster_size_ema", torch.ones(n_codes)) for b in books.values()])
    ours["rvq.ema_sum"] = torch.stack([b.get("embed_ema", b["weight"][:n_codes]) for b in books.values()])
    ours["rvq.initialized"] = torch.tensor(True)
    if not any(k.startswith("image_encoder.") for k in ours):   # the SAM2 image encoder may ship separately
        if sam2_sd is None:
            raise UserError(f"{path} has no SAM2 image encoder: pass the SAM2.1 checkpoint too (sam2_ckpt=sam2.1_hiera_large.pt)")
        ours.update({k: v.float() for k, v in sam2_sd.items() if k.split(".")[0] in SAM2_PARTS and k not in ours})
    size = hiera_size(ours)
    if size is None or "no_mem_embed" not in ours or "mask_encoder.layers.0.mlp.layers.0.weight" not in ours:
        raise UserError(f"{path}: cannot tell the SAM2 size or the mask encoder width from its weights")
    # as their demo runs it: 1024 px, the released config's VQ settings, logits thresholded at 0.5
    config = SAMTokConfig(sam2_config=f"configs/sam2.1/sam2.1_hiera_{size}.yaml", sam2_overrides="", image_size=1024,
                          d_model=ours["no_mem_embed"].shape[-1],
                          mlp_dim=ours["mask_encoder.layers.0.mlp.layers.0.weight"].shape[0],
                          levels=len(books), codebook_size=n_codes, ema_decay=0.99, commitment_weight=1.0,
                          dead_threshold=1.0, mask_threshold=0.5)
    return config, ours
