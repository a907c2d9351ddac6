"""Prompt adherence on the shapes data set: read an image's attributes back with a fixed pixel classifier.

No learning: the background is the nearest palette colour of the median border pixel, the shape is
the largest blob of pixels far from the background, and its colour, shape, size and position follow
from that blob's pixels and geometry. It reads the data set's own images (clean, blurred or noisy)
correctly, so its accuracy on a model's samples measures the model, not the classifier.
"""

import numpy as np
from PIL import Image, ImageFilter

from .data import COLOURS, HALF_EXTENT, POSITION_CENTRES, POSITIONS, SHAPES, SIZES, ShapeSpec

ATTRIBUTES = ("background", "colour", "shape", "size", "position")

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)  # [8, 3]
_MIN_GAP = min(np.linalg.norm(a - b) for i, a in enumerate(_PALETTE) for b in _PALETTE[i + 1:])  # 90 (orange/yellow)
# shape thresholds: (area below the middle - area above) / area is 0.5 for a triangle, 0 for a square or
# circle; the mean coverage of the bounding box's corners is 0.3-0.9 for a square (less when blurred), ~0 for a circle
_TRIANGLE_ASYMMETRY = 0.15
_SQUARE_CORNERS = 0.25
_SIZE_THRESHOLD = HALF_EXTENT["small"] + HALF_EXTENT["large"]  # on the full extent (2 * half), in image sides


def _nearest_colour(rgb, exclude=None):
    d = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        d[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(d))]


def _spread_along_rows(labels, mask):
    """Give every horizontal run of the mask the largest label in it."""
    h, w = mask.shape
    m = np.zeros((h, w + 1), np.int8)  # a zero column keeps runs from wrapping to the next row
    m[:, :w] = mask
    m = m.ravel()
    edges = np.diff(m, prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    flat = np.zeros((h, w + 1), labels.dtype)
    flat[:, :w] = labels
    flat = flat.ravel()
    flat[m == 1] = np.repeat(np.maximum.reduceat(flat, starts), ends - starts)  # max over [start_i, start_i+1)
    return flat.reshape(h, w + 1)[:, :w]


def _largest_component(mask):
    """Largest 4-connected region of a boolean mask [H, W]: spread the largest label along rows, then
    along columns, until nothing changes; the most common label wins."""
    if not mask.any():
        return mask
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        grown = _spread_along_rows(_spread_along_rows(labels, mask).T, mask.T).T
        if np.array_equal(grown, labels):
            break
        labels = grown
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == np.argmax(counts)


def _as_array(image):
    """PIL image or array ([H, W, 3] uint8 / 0..255 float, or [3, H, W]) -> float32 [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {x.shape}")
    return x


def classify(image):
    """Read (background, colour, shape, size, position) off an image; None for what it cannot find."""
    x = _as_array(image)
    h, w, _ = x.shape
    if min(h, w) >= 32:  # a 3x3 median filter removes most pixel noise and keeps edges
        x = np.asarray(Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3)),
                       dtype=np.float32)
    ring = max(1, min(h, w) // 32)
    border = np.concatenate([x[:ring].reshape(-1, 3), x[-ring:].reshape(-1, 3),
                             x[:, :ring].reshape(-1, 3), x[:, -ring:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    out = dict.fromkeys(ATTRIBUTES)
    out["background"] = _nearest_colour(bg_rgb)

    # foreground: the largest blob of pixels clearly away from the background colour
    dist = np.linalg.norm(x - bg_rgb, axis=-1)
    blob = _largest_component(dist > _MIN_GAP / 2)
    if blob.sum() < max(4, h * w // 1000):
        return out
    # its colour: the median of the blob's quarter farthest from the background (the least blurred)
    d_blob = dist[blob]
    fg_rgb = np.median(x[blob][d_blob >= np.percentile(d_blob, 75)], axis=0)
    out["colour"] = _nearest_colour(fg_rgb, exclude=out["background"])

    # coverage of each pixel along the background -> shape colour line (0 = background, 1 = shape);
    # the shape is where it passes 1/2 (straight edges stay in place under blur)
    axis = fg_rgb - bg_rgb
    alpha = (x - bg_rgb) @ axis / max(float(axis @ axis), 1e-6)
    mask = _largest_component(alpha > 0.5)
    if not mask.any():
        mask = blob
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # shape: a triangle is heavier at its base than at its apex; a square fills the corners of its
    # bounding box (beyond 1.2x the inscribed ellipse), a circle leaves them empty
    mid = (y0 + y1) / 2
    asym = (np.sum(ys + 0.5 > mid) - np.sum(ys + 0.5 < mid)) / len(ys)  # ~0.5 for a triangle, ~0 otherwise
    v, u = np.mgrid[y0:y1, x0:x1] + 0.5
    u, v = (u - (x0 + x1) / 2) / ((x1 - x0) / 2), (v - (y0 + y1) / 2) / ((y1 - y0) / 2)
    far = u ** 2 + v ** 2 > 1.44
    corners = float(np.clip(alpha[y0:y1, x0:x1][far], 0, 1).mean()) if far.any() else 0.0
    if abs(asym) > _TRIANGLE_ASYMMETRY:
        out["shape"] = "triangle"
    else:
        out["shape"] = "square" if corners > _SQUARE_CORNERS else "circle"

    # size from the extent of the bounding box, position from its centre
    extent = max((y1 - y0) / h, (x1 - x0) / w)
    out["size"] = SIZES[int(extent > _SIZE_THRESHOLD)]
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    out["position"] = min(POSITIONS, key=lambda p: np.hypot(cx - POSITION_CENTRES[p][0], cy - POSITION_CENTRES[p][1]))
    return out


def score(preds, specs):
    """Per-attribute accuracy of predictions (dicts from classify) against ShapeSpecs, plus "all" (every
    attribute right). A None prediction counts as wrong."""
    if len(preds) != len(specs):
        raise ValueError(f"{len(preds)} predictions for {len(specs)} specs")
    if not specs:
        raise ValueError("nothing to score")
    hits = {a: 0 for a in ATTRIBUTES}
    hits["all"] = 0
    for pred, spec in zip(preds, specs):
        right = [pred.get(a) == getattr(spec, a) for a in ATTRIBUTES]
        for a, r in zip(ATTRIBUTES, right):
            hits[a] += r
        hits["all"] += all(right)
    return {a: n / len(specs) for a, n in hits.items()}


def eval_prompts(variants=3):
    """A fixed list of ShapeSpecs: every (colour, shape) pair, HELD_OUT included, `variants` times each,
    cycling through sizes, positions and backgrounds (72 prompts by default). Prompt = spec.caption(0)."""
    specs = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        backgrounds = [b for b in COLOURS if b != colour]
        for k in range(variants):
            j = i * variants + k
            specs.append(ShapeSpec(colour, shape, SIZES[j % len(SIZES)], POSITIONS[j % len(POSITIONS)],
                                   backgrounds[(i + 3 * k) % len(backgrounds)]))
    return specs



# -----------------------------------------------------------------------------
# evaluating a model: generate one image per prompt, read it back, score seen and held-out pairs


def generate(pipe, specs, *, guidance_scale=7.5, steps=20, sampler="ddim", batch_size=24):
    """One image per spec through `pipe` (a StableDiffusion): prompt = spec.caption(0), seed = its index."""
    from .pipeline import Request

    requests = [Request(spec.caption(0), seed=i, guidance_scale=guidance_scale) for i, spec in enumerate(specs)]
    images = []
    for k in range(0, len(requests), batch_size):
        images += [batch[0] for batch in pipe.generate(requests[k:k + batch_size], steps=steps, sampler=sampler)]
    return images


def score_split(images, specs):
    """{"seen": accuracies, "held_out": accuracies} over the images of seen and of HELD_OUT pairs."""
    result = {}
    for name, held_out in (("seen", False), ("held_out", True)):
        picked = [(img, s) for img, s in zip(images, specs) if s.held_out == held_out]
        if picked:
            result[name] = score([classify(img) for img, _ in picked], [s for _, s in picked])
    return result


def ground_truth(specs, seed=0):
    """score_split of the data set's own renderings (with its colour and position jitter): the
    classifier's accuracy on ground truth, the ceiling for any model."""
    rng = np.random.default_rng(seed)
    return score_split([spec.render(rng=rng) for spec in specs], specs)


def format_scores(title, split):
    """A few aligned lines: one per split, accuracy per attribute in percent."""
    lines = [title]
    for name, accuracies in split.items():
        cells = "  ".join(f"{a} {100 * accuracies[a]:5.1f}%" for a in (*ATTRIBUTES, "all"))
        lines.append(f"  {name:<9}{cells}")
    return "\n".join(lines)
