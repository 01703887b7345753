"""
The embedded default dataset: a deterministic synthetic "shapes world".

Every scene is a pure function of an integer seed: a noisy, textured background
with 1..6 coloured shapes painted on it (later shapes occlude earlier ones).
Each scene comes with everything the SAMTok pipeline needs:

- instance masks (the *visible* part of each shape) and their tight boxes,
- symbolic attributes per object (colour, shape, size word, position word),
- referring expressions ("the red circle", "all the stars", "the purple ring"
  when there is none) whose targets are checked by one `matches` function,
- region captions and a grounded description with character spans.

Why synthetic? It needs no download, it is infinite, and since we know the
ground truth symbolically we can *verify* every text/mask pairing in tests.
Seeds are split into disjoint ranges (SPLITS) so the test split is never seen.
Only numpy is used; all randomness flows from np.random.default_rng(seed).
"""
import numpy as np

# Saturated colours, far from the muted greyish background and from each other.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 225),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "ellipse", "ring")
SPLITS = {"train": (0, 1_000_000), "val": (1_000_000, 1_010_000), "test": (2_000_000, 2_010_000)}

SMALL_MAX, BIG_MIN = 0.02, 0.10   # visible-area fractions separating small / medium / big
SIZES = ("small", "medium", "big")
MIN_PIXELS, MIN_VISIBLE = 12, 0.4  # every final mask keeps >= 12 px and >= 40% of its shape
STAR_INNER = 0.42                  # inner/outer radius of the 5-pointed star

# ----------------------------------------------------------------------------- geometry

def shape_area_coef(shape, extra):
    """Area of `shape` divided by R^2, R = circumradius; lets us size shapes by target area."""
    return {
        "circle": np.pi,
        "square": 2.0,                                       # side = R*sqrt(2)
        "triangle": 3 * np.sqrt(3) / 4,                      # equilateral
        "star": 5 * STAR_INNER * np.sin(np.pi / 5),          # 10 triangles (R, r, pi/5)
        "ellipse": np.pi * extra,                            # extra = minor/major aspect
        "ring": np.pi * (1 - extra ** 2),                    # extra = inner/outer radius
    }[shape]


def shape_mask(shape, cx, cy, radius, angle, extra, size):
    """Rasterise one shape to a (size, size) bool mask by testing pixel centres."""
    # Evaluate only inside the shape's bounding square: small shapes touch few pixels,
    # which is most of what keeps a whole scene at ~1 ms.
    x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, size)
    y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, size)
    dx = np.arange(x0, x1) + 0.5 - cx              # (w,)  pixel centres relative to the shape
    dy = np.arange(y0, y1)[:, None] + 0.5 - cy     # (h,1) broadcasting gives (h, w) below
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c       # coordinates in the shape's rotated frame
    r2 = radius * radius
    if shape == "circle":
        inside = u * u + v * v <= r2
    elif shape == "ellipse":
        inside = (u / radius) ** 2 + (v / (radius * extra)) ** 2 <= 1
    elif shape == "ring":
        rho2 = u * u + v * v
        inside = (rho2 <= r2) & (rho2 >= r2 * extra * extra)
    elif shape in ("square", "triangle"):
        # A regular n-gon is the intersection of n half-planes: the projection on each
        # edge normal must not exceed the apothem R*cos(pi/n).
        n = 4 if shape == "square" else 3
        apothem = radius * np.cos(np.pi / n)
        inside = np.ones(u.shape, bool)
        for k in range(n):
            a = 2 * np.pi * k / n
            inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    elif shape == "star":
        # The star is not convex, but it has 10-fold mirror symmetry: fold every point's
        # angle into [0, pi/5] (0 = towards a tip, pi/5 = towards an inner corner), then
        # one half-plane test against the edge tip->inner corner decides inside/outside.
        rho = np.sqrt(u * u + v * v)
        t = np.mod(np.arctan2(v, u), 2 * np.pi / 5)
        t = np.minimum(t, 2 * np.pi / 5 - t)
        px, py = rho * np.cos(t), rho * np.sin(t)
        bx, by = radius * STAR_INNER * np.cos(np.pi / 5), radius * STAR_INNER * np.sin(np.pi / 5)
        ex, ey = bx - radius, by                           # edge direction from tip (R, 0)
        inside = ex * py - ey * (px - radius) >= 0         # same side as the origin
    else:
        raise ValueError(f"unknown shape {shape!r}, expected one of {SHAPES}")
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def smooth_noise(rng, size, cells, channels):
    """Random values on a coarse cells x cells grid, smoothly upsampled to (size, size, channels)."""
    grid = rng.random((channels, cells, cells), dtype=np.float32) - 0.5
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    i = np.minimum(pos.astype(int), cells - 2)
    f = pos - i
    f = f * f * (3 - 2 * f)                    # smoothstep weights: no visible creases
    w = np.zeros((size, cells), np.float32)
    w[np.arange(size), i], w[np.arange(size), i + 1] = 1 - f, f
    return (w @ grid @ w.T).transpose(1, 2, 0)  # separable interpolation = two small matmuls


def background(rng, size, noise):
    """Muted greyish texture: big soft light/dark blobs, a faint tint, finer blotches, noise.

    The texture is there so that segmentation is not a plain threshold; its values stay
    within ~[40, 200] and low-saturation, so the saturated shapes remain clearly visible.
    """
    lum = rng.uniform(85, 150) + 90 * smooth_noise(rng, size, 3, 1) + 35 * smooth_noise(rng, size, 10, 1)
    tint = 40 * smooth_noise(rng, size, 4, 3)   # slight colour cast that drifts across the image
    return lum + tint + 7 * noise

# ----------------------------------------------------------------------------- words

def size_word(area):
    return SIZES[0] if area < SMALL_MAX else (SIZES[2] if area > BIG_MIN else SIZES[1])


def position_word(cx, cy, size):
    """Thirds of the image -> 'top left', 'left', 'center', 'top', 'bottom right', ..."""
    h = "left" if cx < size / 3 else ("right" if cx > 2 * size / 3 else "center")
    v = "top" if cy < size / 3 else ("bottom" if cy > 2 * size / 3 else "middle")
    if v == "middle":
        return h                       # 'middle center' -> 'center', 'middle left' -> 'left'
    return v if h == "center" else f"{v} {h}"


def where(position):
    """Position word -> prepositional phrase: 'on the left', 'in the center', 'at the top left'."""
    if position in ("left", "right"):
        return f"on the {position}"
    return "in the center" if position == "center" else f"at the {position}"


def matches(obj, attrs):
    """Does object `obj` satisfy every attribute of a referring expression?

    Equality for colour/shape/size. Position is containment of words, because that is
    how people read it: 'the star on the left' also covers a star at the 'top left'.
    This one function both generates and (in tests) verifies every expression.
    """
    for key, want in attrs.items():
        if key == "position":
            if not set(want.split()) <= set(obj["position"].split()):
                return False
        elif obj[key] != want:
            return False
    return True


def ref_text(attrs, plural=False):
    """Attributes -> English: 'the big blue square at the top left', 'all the red objects'."""
    words = [attrs[k] for k in ("size", "color") if k in attrs]
    noun = attrs.get("shape", "object") + ("s" if plural else "")   # all SHAPES pluralise with s
    text = ("all the " if plural else "the ") + " ".join(words + [noun])
    return text + " " + where(attrs["position"]) if "position" in attrs else text


def noun_phrase(obj):
    return f"{obj['size']} {obj['color']} {obj['shape']} {where(obj['position'])}"

# ----------------------------------------------------------------------------- referring expressions

# Attribute combinations tried for unique ("single") and group ("multi") references.
SINGLE_KEYS = (("shape",), ("color",), ("color", "shape"), ("size", "shape"),
               ("size", "color", "shape"), ("shape", "position"), ("color", "shape", "position"))
MULTI_KEYS = (("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"))


def make_refs(rng, objects):
    refs = []
    # single: every attribute combination of each object that picks out exactly that object
    for i, obj in enumerate(objects):
        cands = []
        for keys in SINGLE_KEYS:
            # positions may be named coarsely: an object at 'top left' is also 'on the left'
            positions = [obj["position"]] + (obj["position"].split() if " " in obj["position"] else [])
            for pos in (positions if "position" in keys else [None]):
                attrs = {k: (pos if k == "position" else obj[k]) for k in keys}
                if [j for j, o in enumerate(objects) if matches(o, attrs)] == [i]:
                    cands.append(attrs)
        for c in rng.permutation(len(cands))[:2]:   # up to 2 per object, at random
            refs.append({"text": ref_text(cands[c]), "targets": [i], "kind": "single", "attrs": cands[c]})
    # multi: an attribute value shared by >= 2 objects
    cands = {}
    for keys in MULTI_KEYS:
        for obj in objects:
            attrs = {k: obj[k] for k in keys}
            targets = [j for j, o in enumerate(objects) if matches(o, attrs)]
            if len(targets) >= 2:
                cands[tuple(attrs.items())] = (attrs, targets)   # dict key dedupes repeats
    cands = list(cands.values())
    for c in rng.permutation(len(cands))[:2]:
        refs.append({"text": ref_text(cands[c][0], plural=True), "targets": cands[c][1],
                     "kind": "multi", "attrs": cands[c][0]})
    # none: a colour+shape (sometimes + size) combination absent from the scene, so a model
    # learns to answer "no such object" instead of always pointing at something
    attrs = absent_attrs(rng, objects)
    if attrs:
        refs.append({"text": ref_text(attrs), "targets": [], "kind": "none", "attrs": attrs})
    return refs


def absent_attrs(rng, objects, tries=100):
    """A colour + shape (30 %: + size) combination that matches none of `objects`, or None."""
    for _ in range(tries):
        attrs = {"color": str(rng.choice(list(COLORS))), "shape": str(rng.choice(SHAPES))}
        if rng.random() < 0.3:
            attrs = {"size": str(rng.choice(["small", "medium", "big"])), **attrs}
        if not any(matches(o, attrs) for o in objects):
            return attrs
    return None

# ----------------------------------------------------------------------------- scenes

def sample_area(rng, size):
    """Target area fraction: ~1/3 tiny (<= ~1%), ~1/2 medium, ~1/5 big (up to 35%)."""
    u = rng.random()
    if u < 0.35:
        lo = max(0.003, 20 / size ** 2)            # never below ~20 px, the mask floor is 12
        return float(np.exp(rng.uniform(np.log(lo), np.log(0.012))))
    return float(rng.uniform(0.025, 0.09) if u < 0.8 else rng.uniform(0.11, 0.35))


def make_scene(seed, size=128):
    """One deterministic scene; see the module docstring. Measured ~1 ms per 128x128 scene."""
    rng = np.random.default_rng(seed)
    # One zero-mean, unit-variance per-pixel noise field, shared by the background and
    # (scaled down) the shapes, which cover other pixels anyway. Uniform rather than
    # Gaussian: it looks the same and is ~4x cheaper to draw (0.1 ms vs 0.4 ms).
    noise = (rng.random((size, size, 3), dtype=np.float32) - 0.5) * np.float32(np.sqrt(12))
    image = background(rng, size, noise)
    full, visible, colors, shapes = [], [], [], []
    for _ in range(int(rng.integers(1, 7))):
        color, shape = str(rng.choice(list(COLORS))), SHAPES[int(rng.integers(len(SHAPES)))]
        extra = rng.uniform(0.4, 0.7) if shape == "ellipse" else rng.uniform(0.5, 0.65)
        area = sample_area(rng, size)
        for _attempt in range(20 if full else 1000):    # the first object must always land
            radius = min(np.sqrt(area * size * size / shape_area_coef(shape, extra)), 0.48 * size)
            cx, cy = rng.uniform(radius, size - radius, 2)   # fully inside the image
            mask = shape_mask(shape, cx, cy, radius, rng.uniform(0, 2 * np.pi), extra, size)
            if _fits(mask, color, full, visible, colors):
                break
            area = max(area * 0.9, 0.003)   # crowded scene: retry a bit smaller, not below tiny
        else:
            continue           # could not place it without hiding others: drop this object
        visible = [vis & ~mask for vis in visible]           # the newcomer occludes the rest
        full.append(mask)
        visible.append(mask)
        colors.append(color)
        shapes.append(shape)
        image[mask] = np.add(COLORS[color], rng.uniform(-15, 15)) + 6 * noise[mask]
    return _annotate(rng, np.clip(image, 0, 255).astype(np.uint8), visible, colors, shapes)


def _fits(mask, color, full, visible, colors):
    """Can `mask` be painted on top without breaking the visibility rules of earlier objects?"""
    if mask.sum() < MIN_PIXELS:
        return False
    # a 1-px dilation of the newcomer: same-colour objects must not touch, or they would
    # merge into one blob that no one could segment as two instances
    grown = mask.copy()
    grown[1:] |= mask[:-1]; grown[:-1] |= mask[1:]; grown[:, 1:] |= mask[:, :-1]; grown[:, :-1] |= mask[:, 1:]
    for f, vis, col in zip(full, visible, colors):
        left = np.count_nonzero(vis & ~mask)
        if left < MIN_PIXELS or left < MIN_VISIBLE * np.count_nonzero(f):
            return False
        if col == color and (grown & vis).any():
            return False
    return True


def _annotate(rng, image, visible, colors, shapes):
    """Masks -> boxes, attribute dicts, referring expressions, captions, grounded text."""
    size = image.shape[0]
    masks = np.stack(visible) if visible else np.zeros((0, size, size), bool)
    boxes, objects, centers = [], [], []
    for m, color, shape in zip(masks, colors, shapes):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])   # tight xyxy, exclusive max
        ys, xs = np.nonzero(m)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        area = float(m.sum() / (size * size))
        objects.append({"color": color, "shape": shape, "size": size_word(area),
                        "position": position_word(cx, cy, size), "area": area})
        centers.append((cy, cx))
    # grounded description: objects in reading order (top band first, then left to right)
    order = sorted(range(len(objects)), key=lambda i: (int(centers[i][0] * 3 // size), centers[i][1]))
    text, spans = "", []
    for n, i in enumerate(order):
        text += "A " if n == 0 else (" and a " if n == len(order) - 1 else ", a ")
        phrase = noun_phrase(objects[i])
        spans.append([len(text), len(text) + len(phrase), i])
        text += phrase
    return {
        "image": image,
        "masks": masks,
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "objects": objects,
        "refs": make_refs(rng, objects),
        "captions": [f"a {noun_phrase(o)}." for o in objects],
        "grounded": {"text": text + ".", "spans": spans},
    }

# ----------------------------------------------------------------------------- splits

def scene_seeds(split, n):
    """The first n seeds of a split; the split ranges are disjoint, see SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    if not 0 <= n <= hi - lo:
        raise ValueError(f"n={n} is out of range for split {split!r}: it has {hi - lo} scenes")
    return range(lo, lo + n)


def iter_scenes(split, n, size=128):
    """Yield (seed, scene) for the first n scenes of a split."""
    for seed in scene_seeds(split, n):
        yield seed, make_scene(seed, size)
