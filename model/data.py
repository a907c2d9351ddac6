"""Datasets for training: synthetic captioned shapes, and a folder of captioned images.

The shapes data set is the default model's training data: 64x64 images of one
anti-aliased shape on a plain background, each with a caption that names its
colour, shape, size, position and background. Sample `index` of a data set
built with `seed` is a pure function of (seed, index), so it needs no storage
and every run sees the same data. A few (colour, shape) pairs are held out of
training so that an evaluation can ask for combinations the model never saw.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# vocabulary

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 220, 0),
    "purple": (140, 0, 200),
    "orange": (255, 130, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

# (colour, shape) pairs that never appear in training samples
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle"), ("white", "square"), ("green", "triangle")})

# geometry, as fractions of the image side (so any image_size works)
HALF_EXTENT = {"small": 0.14, "large": 0.23}  # ~9 px and ~15 px at 64x64
_NEAR, _FAR = 0.28, 0.72  # shape centres; a large shape keeps ~3 px from the edge
POSITION_CENTRES = {  # (x, y)
    "top left": (_NEAR, _NEAR),
    "top right": (_FAR, _NEAR),
    "bottom left": (_NEAR, _FAR),
    "bottom right": (_FAR, _FAR),
    "center": (0.5, 0.5),
}
COLOUR_JITTER = 6  # +- units per channel
POSITION_JITTER = 1.0 / 64  # +- fraction of the side (1 px at 64x64)
SUPERSAMPLE = 4  # draw at 4x, then box-filter down: exact area anti-aliasing

# ---------------------------------------------------------------------------
# captions

TEMPLATES = (
    "{a_size} {size} {colour} {shape} in the {pos} on {a_bg} {bg} background",
    "{colour} {shape}, {size}, {pos}, {bg} background",
    "{a_colour} {colour} {shape} at the {pos}, {size}, on {bg}",
    "{size} {colour} {shape} on {a_bg} {bg} background, {pos}",
    "a picture of {a_size} {size} {colour} {shape} in the {pos_corner}, {bg} background",
    "{a_bg} {bg} background with {a_size} {size} {colour} {shape} in the {pos}",
    "{pos}: {a_size} {size} {colour} {shape} on {bg}",
    "an image of {a_size} {size} {colour} {shape}, {pos}, against {a_bg} {bg} background",
    "{size} {shape}, {colour}, {pos} of the image, {bg} background",
)


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `caption(i)` describes it with template i."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def __post_init__(self):
        for value, allowed in ((self.colour, COLOURS), (self.shape, SHAPES), (self.size, SIZES),
                               (self.position, POSITIONS), (self.background, COLOURS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {list(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"shape and background are both {self.colour}")

    @property
    def held_out(self):
        return (self.colour, self.shape) in HELD_OUT

    def caption(self, template_index=0):
        pos_corner = self.position if self.position == "center" else self.position + " corner"
        return TEMPLATES[template_index % len(TEMPLATES)].format(
            colour=self.colour, shape=self.shape, size=self.size, pos=self.position,
            pos_corner=pos_corner, bg=self.background, a_size=_article(self.size),
            a_colour=_article(self.colour), a_bg=_article(self.background))

    def render(self, image_size=64, rng=None):
        return render(self.colour, self.shape, self.size, self.position, self.background, image_size, rng)


def all_specs(include_held_out=True):
    """Every ShapeSpec, in a fixed order."""
    return [ShapeSpec(c, s, z, p, b)
            for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS for b in COLOURS
            if b != c and (include_held_out or (c, s) not in HELD_OUT)]


def all_captions(include_held_out=True):
    """Every spec in every template, in a fixed order (15,120 captions): a corpus for the BPE vocabulary."""
    for spec in all_specs(include_held_out):
        for i in range(len(TEMPLATES)):
            yield spec.caption(i)


# ---------------------------------------------------------------------------
# rendering


def _jitter_colour(rgb, rng):
    if rng is None:
        return tuple(rgb)
    noise = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + noise, 0, 255))


def render(colour, shape, size, position, background, image_size=64, rng=None):
    """Draw one shape on a plain background -> PIL RGB image (image_size x image_size).

    rng: a numpy Generator for colour jitter (+-6 per channel) and position jitter (+-1 px at 64);
    None draws the canonical image.
    """
    spec = ShapeSpec(colour, shape, size, position, background)  # validates
    s = SUPERSAMPLE
    big = image_size * s
    img = Image.new("RGB", (big, big), _jitter_colour(COLOURS[spec.background], rng))
    draw = ImageDraw.Draw(img)
    fill = _jitter_colour(COLOURS[spec.colour], rng)

    cx, cy = POSITION_CENTRES[spec.position]
    if rng is not None:
        cx, cy = np.array([cx, cy]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    cx, cy, r = cx * big, cy * big, HALF_EXTENT[spec.size] * big
    # supersampled pixel i covers [i, i+1); PIL fills pixels whose centres lie inside, so a box
    # [x0, x1) is drawn as [x0, x1 - 1] in PIL's inclusive coordinates
    x0, y0, x1, y1 = (round(v) for v in (cx - r, cy - r, cx + r, cy + r))
    if spec.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif spec.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:  # isosceles triangle pointing up, base 2r, height 2r, its bounding box centred on the position
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def to_tensor(img):
    """PIL RGB image -> float tensor [3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------
# datasets


class ShapesDataset(torch.utils.data.Dataset):
    """`length` random captioned shapes; item `index` depends only on (seed, index).

    Training sets (include_held_out=False) never contain a HELD_OUT (colour, shape) pair.
    """

    def __init__(self, length, seed=0, image_size=64, include_held_out=False):
        self.length, self.seed, self.image_size = length, seed, image_size
        self.include_held_out = include_held_out
        self.pairs = [(c, s) for c in COLOURS for s in SHAPES if include_held_out or (c, s) not in HELD_OUT]

    def __len__(self):
        return self.length

    def _rng(self, index):
        return np.random.default_rng([self.seed, index])

    def _draw(self, rng):
        colour, shape = self.pairs[rng.integers(len(self.pairs))]
        backgrounds = [b for b in COLOURS if b != colour]
        spec = ShapeSpec(colour, shape, SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))],
                         backgrounds[rng.integers(len(backgrounds))])
        return spec, int(rng.integers(len(TEMPLATES)))

    def spec(self, index):
        """(ShapeSpec, template index) of item `index`, without rendering."""
        return self._draw(self._rng(index))

    def sample(self, index):
        """(ShapeSpec, caption, PIL image) of item `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = self._rng(index)
        spec, template = self._draw(rng)
        return spec, spec.caption(template), spec.render(self.image_size, rng)

    def __getitem__(self, index):
        _, caption, img = self.sample(index)
        return to_tensor(img), caption


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def resize_center_crop(img, size):
    """Scale the shorter side to `size` (Lanczos), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (png/jpg/webp) under `root`, each with a caption.

    Captions come from `root/metadata.jsonl` ({"file_name": ..., "text": ...} per line, file_name relative
    to root) when it exists, otherwise from a same-named .txt beside each image (a.png -> a.txt).
    Items: (float tensor [3, image_size, image_size] in [-1, 1], caption str).
    """

    def __init__(self, root, image_size=64, random_flip=False):
        self.root, self.image_size, self.random_flip = Path(root), image_size, random_flip
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        metadata = self.root / "metadata.jsonl"
        self.items = self._from_metadata(metadata) if metadata.exists() else self._from_txt()
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")

    def _from_metadata(self, metadata):
        items = []
        for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                path, text = self.root / entry["file_name"], entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{metadata}:{n}: expected {{\"file_name\": ..., \"text\": ...}}, got {line!r}") from e
            if not path.is_file():
                raise FileNotFoundError(f"{metadata}:{n}: image {path} does not exist")
            items.append((path, str(text)))
        return items

    def _from_txt(self):
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        items = []
        for path in images:
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                raise ValueError(f"image {path} has no caption: expected {txt} or {self.root / 'metadata.jsonl'}")
            items.append((path, txt.read_text(encoding="utf-8").strip()))
        return items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, caption = self.items[index]
        with Image.open(path) as img:
            img = resize_center_crop(img.convert("RGB"), self.image_size)
        x = to_tensor(img)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, caption
