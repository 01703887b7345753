"""
SAMTok, the mask tokenizer: any region mask of an image -> two discrete codes -> the mask again.

"We represent any mask with two words." A SAM2 image encoder sees the image; SAM2's prompt
encoder embeds the mask (dense prompt) and its tight box (two corner points); a new two-way
transformer with one learned query reads both and outputs one 256-d vector z; a two-level
residual VQ (quantizer.py) writes z as codes (c1, c2); SAM2's mask decoder, prompted with
the code embedding e1 + e2 alone, paints the mask back. An LLM can then say a mask as
<|mt_start|><|mt_00xx|><|mt_0yyy|><|mt_end|> (codes_to_text / text_to_codes below).

Training (PAPER.md section 1): image encoder and prompt encoder frozen; the mask encoder, the
SAM2 mask decoder and the codebooks (EMA) learn; loss = 2.0 BCE + 0.5 Dice + 1.0 commitment.

The embedded default (preset tiny) has no pretrained SAM2 to start from, so it first pretrains
a small SAM2 (Hiera trunk + FPN neck + prompt encoder + mask decoder, all from the sam2
package) on the synthetic shapes world with box prompts, the analogue of the paper starting
from SAM2.1, and saves it for reuse. Then the bottleneck: the frozen image features are cached
once, the mask encoder and decoder first learn through the *unquantized* latent (a warm-up),
k-means on the collected latents initialises both codebooks, and training goes on through the
quantizer with EMA codebooks and dead-code restarts.

Run it:
    python tokenizer.py                                    # CPU, preset tiny, ~8 minutes
    python tokenizer.py --device=cuda                      # one GPU
    torchrun --standalone --nproc_per_node=8 tokenizer.py --preset=paper --sam2_ckpt=sam2.1_hiera_large.pt
    # two nodes (run on each, node_rank 0 and 1):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \
        tokenizer.py --preset=paper --sam2_ckpt=sam2.1_hiera_large.pt
Any option is --key=value (see DEFAULTS); --resume=true continues from out_dir/ckpt.pt.
Writes out_dir/ckpt.pt (weights + config), out_dir/metrics.json and out_dir/recon.png.
"""

import os
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, atomic_save, configure, die, init_distributed, lr_at, stop_early, write_json
from quantizer import ResidualVQ

# ----------------------------------------------------------------------------- config
DEFAULTS = dict(
    out_dir="out/tokenizer",
    device="auto",              # auto | cpu | cuda
    seed=0,
    # model: SAM2 from the sam2 package's own config file, with dotlist overrides
    sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml",
    sam2_overrides="trunk.embed_dim=32,trunk.num_heads=1,trunk.stages=[1,2,3,1],"
                   "trunk.global_att_blocks=[4,5],trunk.window_spec=[8,4,4,2],"
                   "trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    sam2_ckpt="",               # official sam2.1_hiera_*.pt; empty: pretrain on the data (tiny)
    image_size=128,             # plain resize to image_size x image_size (aspect ratio not kept)
    d_model=128,                # SAM2 prompt/decoder width = latent dim of z and the codebooks
    mlp_dim=1024,               # MLP width of the two-way transformers
    levels=2, codebook_size=256,
    # data
    data="shapes",              # data.open_dataset spec: shapes | FOLDER (jsonl) | coco:JSON:IMAGES | sa1b:FOLDER | ...
    n_train=4000, n_val=100, n_test=500,   # scenes (shapes) / samples (folder)
    cache_features=True,        # frozen image encoder: compute its features once, reuse them
    # SAM2 pretraining with box prompts (only without --sam2_ckpt)
    pretrain_steps=500, pretrain_batch=16, pretrain_lr=1e-3,   # batches count images
    pretrain_dense_box=0.5,     # fraction of pretraining boxes also drawn as a dense mask prompt
    # the tokenizer itself
    steps=1600, batch_size=16, grad_accum=1,   # images per step per process, with their masks
    masks_per_image=0,          # 0: every mask of each image; else a random subset of this many
    lr=5e-4, weight_decay=0.05, beta2=0.999, grad_clip=1.0, warmup_frac=0.05,
    unquantized_steps=300,      # warm-up through the continuous latent before k-means + VQ
    kmeans_samples=8192,
    bce_weight=2.0, dice_weight=0.5, commitment_weight=1.0,
    ema_decay=0.99, dead_threshold=0.05,
    loss_res=128,               # 0: logits' own resolution (paper); else upsample logits to this
    train_prompt_encoder=True,  # paper: frozen (pretrained); tiny: our SAM2 never saw mask prompts
    train_iou_head=True,        # paper: frozen; tiny: learned so best-of-3 selection works
    mask_threshold=0.0,         # decode threshold on logits (the released scripts use 0.5)
    eval_every=500, log_every=50, ckpt_every=500,
    resume=False,
    stop_after=0,               # stop after this many steps of this run (simulates an interruption)
)
PRESETS = {
    "tiny": {},
    "paper": dict(sam2_config="configs/sam2.1/sam2.1_hiera_l.yaml", sam2_overrides="",
                  image_size=1024, d_model=256, mlp_dim=2048, cache_features=False,
                  pretrain_steps=0, steps=129_000, batch_size=128, masks_per_image=8, lr=4e-5, unquantized_steps=0,
                  kmeans_samples=16384, dead_threshold=1.0, loss_res=0, train_prompt_encoder=False,
                  train_iou_head=False, mask_threshold=0.5, eval_every=5000, ckpt_every=2000,
                  n_train=10_000_000, n_val=200, n_test=1000),
}
SAM2_KEYS = ("sam2_config", "sam2_overrides", "image_size", "d_model", "mlp_dim")

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
    gives level 2 = -1; a level-2 slot holding a level-1 id, or any id out of range, is -1."""
    spans, cur = [], None
    for m in _WORD.finditer(text or ""):
        w = m.group(1)
        if w == "start":
            if cur:
                spans.append(cur)
            cur = []
        elif w == "end":
            if cur:
                spans.append(cur)
            cur = None
        else:
            cur = (cur or []) + [int(w)]
    if cur:
        spans.append(cur)
    out = []
    for ids in spans:
        a, b = ids[0], ids[1] if len(ids) > 1 else -1
        c1 = a if 0 <= a < K else -1
        c2 = b - K if K <= b < 2 * K else -1
        out.append((c1, c2))
    return out


# ----------------------------------------------------------------------------- the model
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_image_encoder(cfg):
    """SAM2's image encoder (Hiera trunk + FPN neck) from the sam2 package's own YAML config,
    with dotlist overrides for the tiny widths. The neck's channel list follows the trunk."""
    import sam2
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    path = cfg["sam2_config"]
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(sam2.__file__), path)
    if not os.path.exists(path):
        raise UserError(f"SAM2 config {cfg['sam2_config']} not found (looked in the sam2 package)")
    enc = OmegaConf.load(path).model.image_encoder
    over = re.findall(r"[\w.]+=(?:\[[^\]]*\]|[^,]+)", cfg["sam2_overrides"])  # commas inside [...]
    enc = OmegaConf.merge(enc, OmegaConf.from_dotlist(over))
    e, n = enc.trunk.embed_dim, len(enc.trunk.stages)
    enc.neck.backbone_channel_list = [int(e * 2 ** i) for i in reversed(range(n))]
    enc.neck.d_model = cfg["d_model"]
    return instantiate(enc)


class SAMTok(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer
        self.cfg = dict(cfg)
        D, S = cfg["d_model"], cfg["image_size"]
        self.grid = S // 16  # SAM2 works on stride-16 features: 64x64 at 1024 px, 8x8 at 128 px
        # Module names match SAM2Base, so an official sam2.1 checkpoint loads by key.
        self.image_encoder = build_image_encoder(cfg)
        self.sam_prompt_encoder = PromptEncoder(embed_dim=D, image_embedding_size=(self.grid, self.grid),
                                                input_image_size=(S, S), mask_in_chans=16)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3, transformer_dim=D, iou_head_depth=3, iou_head_hidden_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=cfg["mlp_dim"], num_heads=8),
            use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
            pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True)
        # single-frame path of SAM2: a learned "no memory" embedding is added to the image features
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, D))
        # The new mask encoder: a two-way transformer over [query, box corner 1, corner 2, pad];
        # the query's output (after its final token->image attention + LayerNorm) is z.
        self.mask_encoder = TwoWayTransformer(depth=2, embedding_dim=D, mlp_dim=cfg["mlp_dim"], num_heads=8)
        self.query = nn.Embedding(1, D)
        self.rvq = ResidualVQ(levels=cfg["levels"], codebook_size=cfg["codebook_size"], dim=D,
                              decay=cfg["ema_decay"], commitment_weight=cfg["commitment_weight"],
                              dead_threshold=cfg["dead_threshold"])

    @property
    def device(self):
        return self.query.weight.device

    # ---- image side
    def preprocess(self, images):
        """uint8 (B, H, W, 3) -> (B, 3, S, S): plain resize, /255, ImageNet mean/std."""
        # a read-only array (an image decoded by PIL) is copied: torch will not wrap one
        images = images if not isinstance(images, np.ndarray) or images.flags.writeable else images.copy()
        x = torch.as_tensor(images, device=self.device).permute(0, 3, 1, 2).float() / 255
        S = self.cfg["image_size"]
        if x.shape[-2:] != (S, S):
            x = F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False)
        return (x - IMAGENET_MEAN.to(x.device)) / IMAGENET_STD.to(x.device)

    def image_features(self, x):
        """(B, 3, S, S) -> raw FPN levels [stride 4, stride 8, stride 16], what the frozen
        encoder produces (and what cache_features stores)."""
        return self.image_encoder(x)["backbone_fpn"]

    def prepare(self, fpn):
        """FPN levels -> (image embedding + no_mem_embed, [high-res s0, s1] for the decoder)."""
        dec = self.sam_mask_decoder
        embed = fpn[2] + self.no_mem_embed.view(1, -1, 1, 1)
        return embed, [dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1])]

    # ---- prompts
    def box_points(self, boxes):
        """xyxy boxes (B, 4) in resized pixels -> SAM2 corner points with labels 2 and 3."""
        return boxes.view(-1, 2, 2), torch.tensor([[2, 3]], device=boxes.device).expand(len(boxes), 2)

    def encode_latent(self, embed, mask_prompt, boxes):
        """Mask encoder: (B, D, g, g) features, (B, 1, 4g, 4g) mask, (B, 4) box -> z (B, D)."""
        sparse, dense = self.sam_prompt_encoder(points=self.box_points(boxes), boxes=None, masks=mask_prompt)
        tokens = torch.cat([self.query.weight.expand(len(boxes), 1, -1), sparse], 1)  # (B, 4, D)
        pos = self.sam_prompt_encoder.get_dense_pe().expand(len(boxes), -1, -1, -1)
        hs, _ = self.mask_encoder(embed + dense, pos, tokens)
        return hs[:, 0]

    def box_mask(self, boxes):
        """(B, 4) boxes -> (B, 1, 4g, 4g) filled rectangles, a dense mask prompt for pretraining."""
        g4, S = 4 * self.grid, self.cfg["image_size"]
        c = (torch.arange(g4, device=boxes.device) + 0.5) * S / g4               # cell centres
        inx = (c[None] >= boxes[:, 0:1]) & (c[None] <= boxes[:, 2:3])             # (B, 4g)
        iny = (c[None] >= boxes[:, 1:2]) & (c[None] <= boxes[:, 3:4])
        return (iny[:, :, None] & inx[:, None, :]).float()[:, None]

    def decode_logits(self, embed, hires, code=None, boxes=None, dense_box=None):
        """SAM2's mask decoder. The code embedding (B, D) is appended to the sparse prompt
        tokens after two padding embeddings; the dense prompt is no_mask_embed. With boxes
        instead (pretraining), a box-prompted SAM2; dense_box (B,) bool says which boxes are
        also drawn as a dense mask prompt. -> logits (B, 3, 4g, 4g), iou (B, 3)."""
        pe = self.sam_prompt_encoder
        B = embed.shape[0]
        if boxes is not None:
            # The box as corner points, and for some samples also drawn as a dense mask prompt.
            # The dense box tells the decoder where to look from step one, so pretraining spends
            # its steps on learning what an object is (box IoU 0.76 after 250 steps, against
            # 0.26 after 600 with corner points alone, which must first learn to localize
            # through attention). The corner-only samples keep teaching that sparse-token path, the
            # one the code token of the tokenizer will use.
            sparse, dense = pe(points=self.box_points(boxes), boxes=None, masks=None)
            if dense_box is not None and dense_box.any():
                drawn = pe.mask_downscaling(self.box_mask(boxes))
                dense = torch.where(dense_box.view(-1, 1, 1, 1), drawn, dense.expand_as(drawn))
        else:
            pad = pe.not_a_point_embed.weight.expand(B, 2, -1)
            sparse = torch.cat([pad, code[:, None]], 1)
            dense = pe.no_mask_embed.weight.view(1, -1, 1, 1).expand(B, -1, self.grid, self.grid)
        logits, iou, _, _ = self.sam_mask_decoder(embed, pe.get_dense_pe(), sparse, dense, multimask_output=True,
                                                  repeat_image=False, high_res_features=hires)
        return logits, iou

    def forward(self, fpn, mask_prompt=None, boxes=None, mode="quant", x=None, img_idx=None, dense_box=None):
        """One training forward (what DDP wraps). mode: "box" = SAM2 pretraining with box
        prompts; "latent" = the tokenizer with the unquantized z (warm-up); "quant" = through
        the residual VQ. Returns logits, predicted IoU, commitment loss, codes. Pass images x
        instead of features fpn to run (and train) the image encoder inside the forward;
        img_idx (B,) then says which image each mask belongs to."""
        embed, hires = self.prepare(self.image_features(x) if fpn is None else fpn)
        if img_idx is not None:  # per image above, per mask below
            embed, hires = embed[img_idx], [h[img_idx] for h in hires]
        if mode == "box":
            logits, iou = self.decode_logits(embed, hires, boxes=boxes, dense_box=dense_box)
            return logits, iou, embed.new_zeros(()), None
        z = self.encode_latent(embed, mask_prompt, boxes)
        commit, codes = z.new_zeros(()), None
        if mode == "quant":
            z, codes, commit = self.rvq(z)
        logits, iou = self.decode_logits(embed, hires, code=z)
        return logits, iou, commit, codes

    # ---- public API
    def _masks_in(self, image, masks):
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
        image, masks = self._masks_in(image, masks)
        H, W = image.shape[:2]
        S, g = self.cfg["image_size"], self.grid
        embed, _ = self.prepare(self.image_features(self.preprocess(image[None])))
        m = torch.as_tensor(masks, device=self.device).float()[:, None]   # (N, 1, H, W)
        prompt = F.interpolate(m, size=(4 * g, 4 * g), mode="bilinear", antialias=True, align_corners=False)
        boxes = boxes_of(masks) * torch.tensor([S / W, S / H, S / W, S / H])
        z = self.encode_latent(embed.expand(len(m), -1, -1, -1), prompt, boxes.to(self.device))
        return self.rvq.quantize(z)[0]

    @torch.no_grad()
    def decode(self, image, codes):
        """codes (N, 2) (-1 = level missing) -> masks (N, H, W) bool at the image's size."""
        image, _ = self._masks_in(image, None)
        codes = torch.as_tensor(np.asarray(codes), device=self.device).long().view(-1, self.cfg["levels"])
        if len(codes) == 0:
            return np.zeros((0, *image.shape[:2]), bool)
        embed, hires = self.prepare(self.image_features(self.preprocess(image[None])))
        n = len(codes)
        logits, iou = self.decode_logits(embed.expand(n, -1, -1, -1), [h.expand(n, -1, -1, -1) for h in hires],
                                         code=self.rvq.embed(codes))
        best = logits[torch.arange(n), iou.argmax(1)][:, None]      # best of 3 by predicted IoU
        up = F.interpolate(best, size=image.shape[:2], mode="bilinear", align_corners=False)
        return (up[:, 0] > self.cfg["mask_threshold"]).cpu().numpy()


def boxes_of(masks):
    """(N, H, W) bool -> (N, 4) float xyxy tight boxes (x2, y2 exclusive), as torch."""
    from data.jsonl import boxes_from_masks  # the one definition of a mask's tight box
    return torch.from_numpy(boxes_from_masks(np.asarray(masks)))


def load_tokenizer(path, device="cpu", sam2_ckpt=""):
    """A trained tokenizer: a checkpoint of this script (ckpt.pt or its folder: weights + the
    config that built them), or the authors' released mask_tokenizer_256x2.pth, converted on the
    fly (convert_released); its image encoder comes from sam2_ckpt if the file has none."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"no tokenizer checkpoint at {path}: run `python tokenizer.py` first")
    ck = read_checkpoint(path)
    if isinstance(ck, dict) and ck.get("stage") == "tokenizer":
        model = SAMTok(ck["config"])
        model.load_state_dict(ck["model"])
    elif isinstance(ck, dict) and "quantizer.codebooks.0.weight" in ck:
        cfg, sd = convert_released(ck, path, read_state_dict(sam2_ckpt) if sam2_ckpt else None)
        model = SAMTok(cfg)
        load_checked(model, sd, path, None)
    else:
        raise UserError(f"{path} is not a tokenizer checkpoint (neither tokenizer.py's nor a released mask_tokenizer_*.pth)")
    return model.to(device).eval()


def read_checkpoint(path):
    """torch.load (tensors and plain containers only: a checkpoint cannot run code), or one line
    naming the file. Any exception is caught: a truncated zip, a text file and a pickle of
    foreign classes all fail in different ways inside torch.load."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160]})")


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
        raise UserError(f"{path} does not fit this model ({model.cfg['sam2_config']}, d_model {model.cfg['d_model']}): "
                        f"{'; '.join(what)}; nothing was loaded.{hint}")
    model.load_state_dict({k: sd[k].to(ours[k].dtype) for k in ours}, strict=False)


def load_sam2_checkpoint(model, path):
    """Load an official sam2.1_hiera_*.pt ({"model": SAM2Base state dict}) into the SAM2 parts,
    all or nothing. Our module names are SAM2Base's, so the keys match one to one; the file's
    video parts (memory attention / encoder, object pointers) are not used on single images. A
    released SAMTok file (SAM2 under "model.sam2_model.") works too."""
    sd = read_state_dict(path)
    load_checked(model, {k.removeprefix(RELEASED_PREFIX): v for k, v in sd.items()}, path, SAM2_PARTS)


RELEASED_PREFIX = "model.sam2_model."
VIDEO_ONLY = ("memory_attention", "memory_encoder", "maskmem_tpos_enc", "no_mem_pos_enc", "obj_ptr_proj",
              "obj_ptr_tpos_proj", "mask_downsample", "no_obj_ptr", "no_obj_embed_spatial")


def convert_released(sd, path, sam2_sd=None):
    """The authors' released tokenizer (mask_tokenizer_256x2.pth, the state dict of VQ_SAM2 in
    bytedance/Sa2VA projects/samtok) -> (config, our state dict). Their model is ours, renamed:
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
    K = books[0]["weight"].shape[0] - 1
    ours["rvq.codebook"] = torch.stack([b["weight"][:K] for b in books.values()])
    ours["rvq.ema_count"] = torch.stack([b.get("cluster_size_ema", torch.ones(K)) for b in books.values()])
    ours["rvq.ema_sum"] = torch.stack([b.get("embed_ema", b["weight"][:K]) for b in books.values()])
    ours["rvq.initialized"] = torch.tensor(True)
    if not any(k.startswith("image_encoder.") for k in ours):   # the SAM2 image encoder may ship separately
        if sam2_sd is None:
            raise UserError(f"{path} has no SAM2 image encoder: pass the SAM2.1 checkpoint too (sam2_ckpt=sam2.1_hiera_large.pt)")
        ours.update({k: v.float() for k, v in sam2_sd.items() if k.split(".")[0] in SAM2_PARTS and k not in ours})
    size = hiera_size(ours)
    if size is None or "no_mem_embed" not in ours or "mask_encoder.layers.0.mlp.layers.0.weight" not in ours:
        raise UserError(f"{path}: cannot tell the SAM2 size or the mask encoder width from its weights")
    cfg = {**DEFAULTS, **PRESETS["paper"], "preset": "released", "sam2_config": f"configs/sam2.1/sam2.1_hiera_{size}.yaml",
           "d_model": ours["no_mem_embed"].shape[-1], "mlp_dim": ours["mask_encoder.layers.0.mlp.layers.0.weight"].shape[0],
           "levels": len(books), "codebook_size": K, "image_size": 1024, "mask_threshold": 0.5}  # as their demo runs it
    return cfg, ours


# ----------------------------------------------------------------------------- data
def load_split(cfg, split):
    """The first n scenes of a split of --data, as a list of scene dicts (image (H, W, 3) uint8,
    masks (N, H, W), ...) read through data.open_dataset: shapes, a jsonl folder, coco:...,
    refcoco:..., grefcoco:..., sa1b:... (see data/__init__.py). Formats without splits of their
    own are split 90/5/5 by a hash of the image name; skipped items are summed up on stderr."""
    from collections import Counter
    from itertools import islice
    from data import open_dataset
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"]}[split]
    spec = cfg["data"]
    if spec == "shapes":    # the world drawn at the model's resolution (up to 512 px)
        spec = f"shapes:{min(cfg['image_size'], 512)}"
    cap = cfg["masks_per_image"] * 4    # enough for masks_per_image draws, far fewer than SA-1B's ~100
    scenes = list(islice(open_dataset(spec, Counter(), split=split, max_masks=cap), n))
    if not scenes:
        raise UserError(f"{cfg['data']} has no usable samples for the {split} split")
    return scenes


class MaskSet:
    """Every (scene, mask) pair of a split as flat tensors at the model's resolution: the mask
    (M, S, S), its mask prompt at 4x the feature grid (M, 1, 4g, 4g), its box in resized
    pixels (M, 4), and the index of its scene (M,)."""

    def __init__(self, scenes, S, g):
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

    def masks_of(self, scenes, cap=0, generator=None):
        """All mask indices of the given scenes (at most `cap` random ones per scene when cap > 0),
        and for each mask its position in `scenes`."""
        idx = [torch.arange(self.start[s], self.start[s + 1]) for s in scenes.tolist()]
        if cap:
            idx = [ix[torch.randperm(len(ix), generator=generator)[:cap]] for ix in idx]
        pos = torch.cat([torch.full((len(ix),), i) for i, ix in enumerate(idx)])
        return torch.cat(idx), pos

    def __len__(self):
        return len(self.masks)


def resize_image(image, S):
    if image.shape[:2] == (S, S):
        return image
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((S, S), Image.BILINEAR))


# ----------------------------------------------------------------------------- loss and metrics
def mask_loss(logits, iou_pred, gt, cfg):
    """2.0 x sigmoid BCE + 0.5 x Dice on the best of the 3 multimask outputs (SAM's
    min-over-outputs), plus MSE of the IoU head against the true IoU of each output."""
    if cfg["loss_res"]:
        logits = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    else:  # paper: GT nearest-resized to the logits' resolution
        gt = F.interpolate(gt[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0] > 0.5
    t = gt[:, None].float().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-1, -2))  # (B, 3)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-1, -2)) + 1) / (p.sum((-1, -2)) + t.sum((-1, -2)) + 1)
    per = cfg["bce_weight"] * bce + cfg["dice_weight"] * dice
    best = per.argmin(1)
    loss = per[torch.arange(len(per)), best].mean()
    with torch.no_grad():
        pred = logits > cfg["mask_threshold"]
        inter = (pred & (t > 0)).sum((-1, -2)).float()
        union = (pred | (t > 0)).sum((-1, -2)).float()
        true_iou = inter / union.clamp(min=1)
        chosen_iou = true_iou[torch.arange(len(per)), iou_pred.argmax(1)].mean()
    if cfg["train_iou_head"]:
        loss = loss + F.mse_loss(iou_pred.float(), true_iou)
    return loss, chosen_iou


def iou(a, b):
    """IoU of two bool arrays (..., H, W), per leading index."""
    a, b = np.asarray(a), np.asarray(b)
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


AREA_BUCKETS = [(0.0, 0.005, "<0.5%"), (0.005, 0.02, "0.5-2%"), (0.02, 0.1, "2-10%"), (0.1, 1.01, ">10%")]


@torch.no_grad()
def evaluate(model, ms, cfg, batch=64, level1=False, return_preds=False, boxes=False):
    """Encode -> two codes -> decode every mask of a MaskSet; IoU at the model's resolution.
    level1=True drops level 2 (code -1) before decoding; boxes=True skips the tokenizer and
    prompts SAM2 with the true box (the pretraining check). -> ious (M,), codes (M, L), preds."""
    was_training = model.training
    model.eval()
    S = cfg["image_size"]
    ious, codes_all, preds = [], [], []
    for start in range(0, len(ms), batch):
        idx = torch.arange(start, min(start + batch, len(ms)))
        scenes, inv = ms.scene[idx].unique(return_inverse=True)  # each image through the encoder once
        fpn = model.image_features(model.preprocess(ms.images[scenes.numpy()]))
        embed, hires = model.prepare(fpn)
        embed, hires = embed[inv], [h[inv] for h in hires]
        dev = model.device
        if boxes:
            codes = torch.zeros(len(idx), cfg["levels"], dtype=torch.long)
            logits, iou_pred = model.decode_logits(embed, hires, boxes=ms.boxes[idx].to(dev))
        else:
            z = model.encode_latent(embed, ms.prompts[idx].to(dev), ms.boxes[idx].to(dev))
            codes = model.rvq.quantize(z)[0]
            if level1:
                codes[:, 1:] = -1
            if bool(model.rvq.initialized):
                z = model.rvq.embed(codes)
            logits, iou_pred = model.decode_logits(embed, hires, code=z)
        best = logits[torch.arange(len(idx)), iou_pred.argmax(1)][:, None]
        pred = F.interpolate(best.float(), size=(S, S), mode="bilinear", align_corners=False)[:, 0] > cfg["mask_threshold"]
        pred = pred.cpu()
        ious.append(iou(pred.numpy(), ms.masks[idx].numpy()))
        codes_all.append(codes.cpu())
        if return_preds:
            preds.append(pred)
    model.train(was_training)
    return np.concatenate(ious), torch.cat(codes_all), (torch.cat(preds) if return_preds else None)


def save_grid(path, ms, preds, preds_l1, n_scenes=8):
    """A PNG: per test scene, the image, the input masks, the 2-code and the level-1 rebuilds."""
    from PIL import Image, ImageDraw
    from common import overlay
    rows = []
    for s in range(min(n_scenes, len(ms.images))):
        sel = (ms.scene == s).nonzero()[:, 0]
        img = ms.images[s]
        rows.append(np.concatenate([img, overlay(img, ms.masks[sel].numpy()), overlay(img, preds[sel].numpy()),
                                    overlay(img, preds_l1[sel].numpy())], 1))
    grid = np.concatenate(rows, 0)
    img = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    header = Image.new("RGB", (img.width, 24), "white")
    draw, w = ImageDraw.Draw(header), img.width // 4
    for i, title in enumerate(["image", "input masks", "2 codes -> masks", "level 1 only"]):
        draw.text((i * w + 6, 6), title, fill="black")
    page = Image.new("RGB", (img.width, img.height + 24), "white")
    page.paste(header, (0, 0))
    page.paste(img, (0, 24))
    page.save(path)


def main():
    try:
        cfg = configure(DEFAULTS, PRESETS)
    except UserError as e:
        die(e)
    rank, world, device = init_distributed(cfg["device"])
    master = rank == 0
    torch.manual_seed(cfg["seed"] + rank)
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)  # each rank draws its own masks
    t_start = time.time()
    if master:
        print("config:", {k: v for k, v in cfg.items()})
    out = cfg["out_dir"]
    ckpt_path, sam2_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "sam2_pretrained.pt")
    try:
        train_ms = MaskSet(load_split(cfg, "train"), cfg["image_size"], cfg["image_size"] // 16)
        val_ms = MaskSet(load_split(cfg, "val"), cfg["image_size"], cfg["image_size"] // 16)
    except (UserError, FileNotFoundError, ValueError) as e:
        die(e)
    if master:
        print(f"data: {len(train_ms.images)} train images / {len(train_ms)} masks, {len(val_ms)} val masks")

    model = SAMTok(cfg).to(device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    step, resumed = 0, None
    if cfg["resume"]:
        if not os.path.exists(ckpt_path):
            die(f"--resume: no checkpoint at {ckpt_path}")
        resumed = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if any(resumed["config"][k] != cfg[k] for k in SAM2_KEYS):
            die(f"--resume: {ckpt_path} was trained with another model config")
        model.load_state_dict(resumed["model"])
        step = resumed["step"]
        if master:
            print(f"resuming from step {step}")

    def wrap(m):  # DDP when torchrun started us; parameters unused in a phase are allowed
        if world == 1:
            return m
        return torch.nn.parallel.DistributedDataParallel(m, device_ids=[device.index] if cuda else None,
                                                         find_unused_parameters=True)

    def sample(n):
        """A training batch the way SAM trains: n random images and (up to masks_per_image of)
        their masks; the image-level work then runs once per image, not once per mask."""
        scenes = torch.randint(len(train_ms.images), (n,), generator=gen)
        idx, img_idx = train_ms.masks_of(scenes, cfg["masks_per_image"], gen)
        return scenes, idx, img_idx

    # ---------------------------------------------------------------- phase 1: SAM2 weights
    # a saved pretraining is reused only when everything that shaped it is the same
    sam2_meta = {k: cfg[k] for k in cfg if k in SAM2_KEYS + ("data", "n_train", "seed") or k.startswith("pretrain_")}
    if resumed is not None:
        pass  # the checkpoint holds every weight
    elif cfg["sam2_ckpt"]:
        try:
            load_sam2_checkpoint(model, cfg["sam2_ckpt"])
        except UserError as e:
            die(e)
    elif os.path.exists(sam2_path) and torch.load(sam2_path, weights_only=False)["meta"] == sam2_meta:
        model.load_state_dict(torch.load(sam2_path, weights_only=False)["model"], strict=False)
        if master:
            print(f"reusing the pretrained SAM2 in {sam2_path}")
    elif cfg["pretrain_steps"] > 0:
        # No pretrained SAM2 for the synthetic world: learn one, SAM-style, from box prompts.
        # The prompt -> mask task forces the image encoder to learn what an object is; the
        # tokenizer later relies on exactly these features (frozen).
        for p in model.parameters():
            p.requires_grad = False
        sam2_parts = [model.image_encoder, model.sam_prompt_encoder, model.sam_mask_decoder]
        params = [p for m in sam2_parts for p in m.parameters()] + [model.no_mem_embed]
        for p in params:
            p.requires_grad = True
        opt = torch.optim.AdamW(params, lr=cfg["pretrain_lr"], weight_decay=0.01)
        net, B, t0 = wrap(model), cfg["pretrain_batch"], time.time()
        for i in range(cfg["pretrain_steps"]):
            lr = lr_at(i, cfg["pretrain_steps"], cfg["pretrain_lr"], cfg["warmup_frac"])
            for gr in opt.param_groups:
                gr["lr"] = lr
            scenes, idx, img_idx = sample(B)
            x = model.preprocess(train_ms.images[scenes.numpy()])
            box = train_ms.boxes[idx]
            wh = (box[:, 2:] - box[:, :2]).repeat(1, 2)
            box = box + 0.05 * wh * torch.randn(box.shape, generator=gen)  # SAM's box jitter
            with amp:
                dense_box = torch.rand(len(idx), generator=gen) < cfg["pretrain_dense_box"]
                logits, iou_pred, _, _ = net(None, boxes=box.to(device), mode="box", x=x, img_idx=img_idx.to(device),
                                             dense_box=dense_box.to(device))
                loss, tr_iou = mask_loss(logits.float(), iou_pred, train_ms.masks[idx].to(device), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            if master and (i % cfg["log_every"] == 0 or i == cfg["pretrain_steps"] - 1):
                dt = (time.time() - t0) / (i + 1)
                print(f"sam2 pretrain {i:5d} | loss {loss.item():.4f} | iou {tr_iou.item():.3f} | lr {lr:.2e} "
                      f"| {dt * 1000:.0f} ms/step | {len(idx) / dt:.0f} masks/s")
        if master:
            print(f"sam2 pretrain val | box-prompt mIoU (corner points only) {evaluate(model, val_ms, cfg, boxes=True)[0].mean():.4f}")
        if master:
            sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("mask_encoder", "query", "rvq"))}
            atomic_save({"stage": "sam2", "meta": sam2_meta, "model": sd}, sam2_path)
            print(f"saved the pretrained SAM2 to {sam2_path}")
    elif master:
        print("warning: no --sam2_ckpt and pretrain_steps=0: the image encoder stays random")
    if world > 1:
        for p in model.parameters():
            torch.distributed.broadcast(p.data, 0)  # rank 0's SAM2 weights everywhere

    # ---------------------------------------------------------------- phase 2: the tokenizer
    # Frozen: image encoder (and no_mem_embed); prompt encoder and IoU/object heads as configured.
    for p in model.parameters():
        p.requires_grad = True
    frozen = [model.image_encoder, model.no_mem_embed]
    if not cfg["train_prompt_encoder"]:
        frozen.append(model.sam_prompt_encoder)
    if not cfg["train_iou_head"]:
        frozen += [model.sam_mask_decoder.iou_prediction_head, model.sam_mask_decoder.pred_obj_score_head]
    for m in frozen:
        for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()):
            p.requires_grad = False
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"], betas=(0.9, cfg["beta2"]))
    if resumed is not None and "optimizer" in resumed:
        opt.load_state_dict(resumed["optimizer"])
    model.image_encoder.eval()  # frozen: no dropout / drop-path noise in its features

    cache = None
    if cfg["cache_features"]:
        # The frozen encoder gives the same features every epoch: compute them once (fp16).
        t0 = time.time()
        parts = [[], [], []]
        with torch.no_grad(), amp:
            for i in range(0, len(train_ms.images), 64):
                for level, f in enumerate(model.image_features(model.preprocess(train_ms.images[i:i + 64]))):
                    parts[level].append(f.half())
        cache = [torch.cat(p) for p in parts]
        del parts
        if master:
            mb = sum(c.numel() * 2 for c in cache) / 2 ** 20
            print(f"cached image features: {mb:.0f} MB in {time.time() - t0:.1f} s")

    def fpn_for(sc):
        if cache is not None:
            return [c[sc].to(device).float() for c in cache]
        with torch.no_grad(), amp:
            return [f.float() for f in model.image_features(model.preprocess(train_ms.images[sc.numpy()]))]

    def save(step):
        if master:
            atomic_save({"stage": "tokenizer", "config": cfg, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "step": step}, ckpt_path)
            write_json(os.path.join(out, "config.json"), cfg)  # the effective config, beside it

    net = wrap(model)
    B, steps, t0, run_steps = cfg["batch_size"], cfg["steps"], time.time(), 0
    model.rvq.reset_window()
    while step < steps:
        if step == cfg["unquantized_steps"] and not bool(model.rvq.initialized):
            # Data-driven codebooks: k-means on latents of the warmed-up encoder, residual per level.
            with torch.no_grad():
                zs = []
                while sum(map(len, zs)) < cfg["kmeans_samples"]:
                    scenes, idx, img_idx = sample(64)
                    embed, _ = model.prepare(fpn_for(scenes))
                    zs.append(model.encode_latent(embed[img_idx], train_ms.prompts[idx].to(device),
                                                  train_ms.boxes[idx].to(device)).float())
                model.rvq.init_codebooks(torch.cat(zs))
            if master:
                print(f"step {step}: codebooks initialised by k-means on {len(torch.cat(zs))} latents")
        mode = "quant" if step >= cfg["unquantized_steps"] else "latent"
        lr = lr_at(step, steps, cfg["lr"], cfg["warmup_frac"])
        for gr in opt.param_groups:
            gr["lr"] = lr
        for micro in range(cfg["grad_accum"]):
            scenes, idx, img_idx = sample(B)
            with amp:
                logits, iou_pred, commit, codes = net(fpn_for(scenes), train_ms.prompts[idx].to(device),
                                                      train_ms.boxes[idx].to(device), mode=mode, img_idx=img_idx.to(device))
                loss, tr_iou = mask_loss(logits.float(), iou_pred, train_ms.masks[idx].to(device), cfg)
                loss = (loss + commit) / cfg["grad_accum"]
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        run_steps += 1
        if master and (step % cfg["log_every"] == 0 or step == steps):
            dt = (time.time() - t0) / run_steps
            h = model.rvq.health()
            print(f"step {step:5d} {mode:6s} | loss {loss.item() * cfg['grad_accum']:.4f} | commit {commit.item():.4f} "
                  f"| iou {tr_iou.item():.3f} | usage {'/'.join(f'{u:.0%}' for u in h['usage'])} "
                  f"| lr {lr:.2e} | {dt * 1000:.0f} ms/step | {len(idx) * cfg['grad_accum'] * world / dt:.0f} masks/s")
            model.rvq.reset_window()
        if master and cfg["eval_every"] and step % cfg["eval_every"] == 0 and step < steps:
            vi = evaluate(model, val_ms, cfg)[0]
            print(f"step {step:5d} val | recon mIoU {vi.mean():.4f}" + ("" if mode == "quant" else " (unquantized)"))
        if step % cfg["ckpt_every"] == 0 or step == steps:
            save(step)
        if stop_early(cfg, run_steps, step, steps, master):
            return
    train_seconds = time.time() - t_start

    # ---------------------------------------------------------------- test
    if not master:
        return
    test_ms = MaskSet(load_split(cfg, "test"), cfg["image_size"], cfg["image_size"] // 16)
    t0 = time.time()
    ious, codes, preds = evaluate(model, test_ms, cfg, return_preds=True)
    masks_per_s = len(test_ms) / (time.time() - t0)
    ious1, _, preds1 = evaluate(model, test_ms, cfg, level1=True, return_preds=True)
    counts = torch.stack([torch.bincount(codes[:, l], minlength=cfg["codebook_size"]) for l in range(cfg["levels"])]).float()
    health = model.rvq.health(counts)
    area = test_ms.area.numpy()
    by_area = {name: float(ious[(area >= lo) & (area < hi)].mean()) if ((area >= lo) & (area < hi)).any() else None
               for lo, hi, name in AREA_BUCKETS}
    metrics = {"recon_miou": float(ious.mean()), "recon_miou_level1": float(ious1.mean()),
               "recon_miou_by_area": by_area, "usage": health["usage"], "perplexity": health["perplexity"],
               "masks_per_s": masks_per_s, "train_seconds": train_seconds,
               "test_masks": len(test_ms), "preset": cfg["preset"]}
    write_json(os.path.join(out, "metrics.json"), metrics)
    save_grid(os.path.join(out, "recon.png"), test_ms, preds, preds1)
    print(f"test: recon mIoU {metrics['recon_miou']:.4f} (level 1 only {metrics['recon_miou_level1']:.4f}) "
          f"on {len(test_ms)} masks | by area " + ", ".join(f"{k} {v:.3f}" for k, v in by_area.items() if v is not None))
    print(f"test: usage {health['usage']} | perplexity {[round(p, 1) for p in health['perplexity']]} "
          f"| {masks_per_s:.0f} masks/s | trained in {train_seconds:.0f} s")
    print(f"wrote {out}/ckpt.pt, {out}/metrics.json, {out}/recon.png")


if __name__ == "__main__":
    main()
