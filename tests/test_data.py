"""Datasets (synthetic shapes, image folder) and the shapes classifier used for prompt adherence."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from model.data import (COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, TEMPLATES, ImageFolderDataset,
                        ShapesDataset, ShapeSpec, all_captions, all_specs, render, to_tensor)
from model.shapes_eval import ATTRIBUTES, classify, eval_prompts, score


# ---------------------------------------------------------------------------
# shapes data set


def test_items_are_a_pure_function_of_seed_and_index():
    a, b = ShapesDataset(40, seed=3), ShapesDataset(40, seed=3)
    order = list(range(40))
    first = {i: a[i] for i in order}
    for i in reversed(order):  # other order, other instance: same items
        x, caption = b[i]
        assert caption == first[i][1]
        assert torch.equal(x, first[i][0])
    x, caption = first[0]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(caption, str)
    other = ShapesDataset(40, seed=4)
    assert sum(torch.equal(other[i][0], first[i][0]) for i in order) < 5
    assert len(a) == 40
    with pytest.raises(IndexError):
        a[40]


def test_dataloader_batches():
    x, captions = next(iter(torch.utils.data.DataLoader(ShapesDataset(8, seed=0), batch_size=4)))
    assert x.shape == (4, 3, 64, 64) and len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_held_out_pairs_never_in_training_set():
    train = ShapesDataset(3000, seed=0)
    specs = [train.spec(i)[0] for i in range(len(train))]
    pairs = {(s.colour, s.shape) for s in specs}
    assert not pairs & HELD_OUT
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT  # every other pair is there
    for attr, values in (("size", SIZES), ("position", POSITIONS), ("background", COLOURS)):
        assert {getattr(s, attr) for s in specs} == set(values)
    assert all(s.colour != s.background for s in specs)
    # the captions agree with the specs, and never name a held-out pair either
    for i in range(0, 3000, 10):
        spec, caption, _ = train.sample(i)
        assert spec == specs[i] and caption == spec.caption(train.spec(i)[1])

    evaluation = ShapesDataset(3000, seed=0, include_held_out=True)
    pairs = {(s.colour, s.shape) for s in (evaluation.spec(i)[0] for i in range(len(evaluation)))}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES}


def _words(caption):
    return re.findall(r"[a-z]+", caption)


def test_every_caption_names_every_attribute():
    specs = all_specs()
    assert len(specs) == 8 * 3 * 2 * 5 * 7
    for spec in specs:
        for i in range(len(TEMPLATES)):
            caption = spec.caption(i)
            words = _words(caption)
            assert spec.colour in words and spec.shape in words and spec.size in words, caption
            assert spec.background in words, caption
            assert spec.position in caption, caption
            assert not re.search(r"\ba [aeiou]", caption), caption  # "an orange", not "a orange"
    captions = list(all_captions())
    assert captions == list(all_captions()) and len(set(captions)) == len(captions) == len(specs) * len(TEMPLATES)
    assert max(len(c.split()) for c in captions) < 20  # far inside CLIP's 77 tokens


def test_caption_phrasings():
    spec = ShapeSpec("red", "circle", "large", "top left", "blue")
    captions = {spec.caption(i) for i in range(len(TEMPLATES))}
    assert len(captions) == len(TEMPLATES) >= 8
    assert {"a large red circle in the top left on a blue background",
            "a red circle at the top left, large, on blue",
            "large red circle on a blue background, top left",
            "a picture of a large red circle in the top left corner, blue background",
            "red circle, large, top left, blue background"} <= captions
    centre = ShapeSpec("orange", "square", "small", "center", "white").caption(4)
    assert centre == "a picture of a small orange square in the center, white background"


def test_spec_validation():
    with pytest.raises(ValueError, match="both red"):
        ShapeSpec("red", "circle", "large", "center", "red")
    with pytest.raises(ValueError, match="hexagon"):
        ShapeSpec("red", "hexagon", "large", "center", "blue")
    assert ShapeSpec("purple", "triangle", "small", "center", "blue").held_out


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_render_is_antialiased_and_inside_the_image(image_size):
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for position in POSITIONS:
            spec = ShapeSpec("white", shape, "large", position, "black")
            for r in (None, rng):
                x = np.asarray(spec.render(image_size, r)).astype(int)
                assert x.shape == (image_size, image_size, 3)
                border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
                assert np.abs(border - border[0]).max() == 0 and border[0].max() <= 6  # plain black, jittered
                grey = x.mean(-1)
                assert (grey > 240).sum() > 0.05 * image_size ** 2  # the shape
                assert ((grey > 20) & (grey < 230)).sum() > 0  # anti-aliased edge levels
    # canonical colours without rng; within +-6 per channel with it
    img = np.asarray(render("purple", "square", "large", "center", "yellow")).astype(int)
    assert tuple(img[32, 32]) == COLOURS["purple"] and tuple(img[0, 0]) == COLOURS["yellow"]
    img = np.asarray(render("purple", "square", "large", "center", "yellow", rng=rng)).astype(int)
    assert np.abs(img[32, 32] - COLOURS["purple"]).max() <= 6 and np.abs(img[0, 0] - COLOURS["yellow"]).max() <= 6


def test_to_tensor_range():
    x = to_tensor(Image.new("RGB", (2, 2), (0, 255, 127)))
    assert x.shape == (3, 2, 2)
    assert torch.allclose(x[:, 0, 0], torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


# ---------------------------------------------------------------------------
# image folder


def _stripes(w, h):
    """Left third red, middle green, right third blue."""
    x = np.zeros((h, w, 3), np.uint8)
    x[:, : w // 3, 0] = 255
    x[:, w // 3: 2 * w // 3, 1] = 255
    x[:, 2 * w // 3:, 2] = 255
    return Image.fromarray(x)


def test_image_folder_txt_captions(tmp_path):
    _stripes(150, 50).save(tmp_path / "a.png")
    _stripes(48, 96).convert("L").save(tmp_path / "b.jpg", quality=95)
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(tmp_path / "c.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "sub" / "d.webp")
    for name, text in [("a", "stripes"), ("b", "grey stripes\n"), ("c", "red"), ("sub/d", "blue")]:
        (tmp_path / f"{name}.txt").write_text(text)
    (tmp_path / "notes.md").write_text("not an image")

    ds = ImageFolderDataset(tmp_path, image_size=32)
    assert len(ds) == 4
    items = [ds[i] for i in range(4)]
    assert [c for _, c in items] == ["stripes", "grey stripes", "red", "blue"]
    for x, _ in items:
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    # 150x50 -> 96x32 -> centre 32x32: the middle (green) third
    x = items[0][0]
    assert x[1].mean() > 0.8 and x[0].mean() < -0.8 and x[2].mean() < -0.8
    # the portrait one keeps its middle rows: every column shows the stripes' pattern
    assert torch.allclose(items[1][0][:, 0], items[1][0][:, -1], atol=0.1)
    assert torch.allclose(items[3][0][2], torch.ones(32, 32), atol=0.02)


def test_image_folder_metadata_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    _stripes(60, 60).save(tmp_path / "img" / "x.png")
    _stripes(60, 60).save(tmp_path / "y.jpeg")
    lines = [{"file_name": "img/x.png", "text": "a striped square"}, {"file_name": "y.jpeg", "text": "stripes"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(d) for d in lines) + "\n\n")
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert len(ds) == 2 and ds[0][1] == "a striped square" and ds[1][1] == "stripes"
    x = ds[0][0]
    assert x.shape == (3, 16, 16)
    assert x[0, :, 0].mean() > 0.9 and x[2, :, -1].mean() > 0.9  # red on the left, blue on the right

    # flips: off by default, both orientations when on
    assert all(torch.equal(ds[0][0], x) for _ in range(5))
    flipping = ImageFolderDataset(tmp_path, image_size=16, random_flip=True)
    torch.manual_seed(0)
    seen = [flipping[0][0] for _ in range(20)]
    assert any(torch.equal(s, x) for s in seen) and any(torch.equal(s, x.flip(-1)) for s in seen)
    assert all(torch.equal(s, x) or torch.equal(s, x.flip(-1)) for s in seen)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match="lonely.png has no caption"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file": "lonely.png"}) + "\n")
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        ImageFolderDataset(tmp_path)


# ---------------------------------------------------------------------------
# classifier


def _degrade(img, sigma, noise, rng):
    x = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    return np.clip(x + rng.normal(0, noise, x.shape), 0, 255).astype(np.uint8)


def test_classifier_reads_the_data_set():
    ds = ShapesDataset(300, seed=123, include_held_out=True)
    samples = [ds.sample(i) for i in range(len(ds))]
    specs = [s for s, _, _ in samples]
    assert sum(s.held_out for s in specs) > 30
    rng = np.random.default_rng(0)
    results = {
        "clean": score([classify(img) for _, _, img in samples], specs),
        "blur1+noise8": score([classify(_degrade(img, 1.0, 8, rng)) for _, _, img in samples], specs),
        "blur2+noise20": score([classify(_degrade(img, 2.0, 20, rng)) for _, _, img in samples[:100]], specs[:100]),
    }
    for name, acc in results.items():
        print(name, " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
    for attr in ATTRIBUTES:
        assert results["clean"][attr] >= 0.98, results
        assert results["blur1+noise8"][attr] >= 0.98, results
        assert results["blur2+noise20"][attr] >= 0.95, results


def test_classifier_inputs_and_empty_images():
    spec = ShapeSpec("orange", "triangle", "large", "bottom right", "green")
    img = spec.render(128)  # other sizes work too
    want = {a: getattr(spec, a) for a in ATTRIBUTES}
    assert classify(img) == want
    x = np.asarray(img)
    assert classify(x) == want and classify(x.transpose(2, 0, 1)) == want and classify(x.astype(float)) == want
    plain = classify(Image.new("RGB", (64, 64), (250, 250, 250)))
    assert plain == {"background": "white", "colour": None, "shape": None, "size": None, "position": None}
    with pytest.raises(ValueError):
        classify(np.zeros((64, 64)))


def test_score():
    specs = [ShapeSpec("red", "circle", "small", "center", "blue"),
             ShapeSpec("blue", "square", "large", "top left", "red")]
    preds = [{a: getattr(specs[0], a) for a in ATTRIBUTES}, dict.fromkeys(ATTRIBUTES)]
    preds[1]["background"] = "red"
    acc = score(preds, specs)
    assert acc == {"background": 1.0, "colour": 0.5, "shape": 0.5, "size": 0.5, "position": 0.5, "all": 0.5}
    with pytest.raises(ValueError):
        score(preds[:1], specs)


def test_eval_prompts():
    specs = eval_prompts()
    assert specs == eval_prompts() and len(specs) == 72 and len(set(specs)) == 72
    pairs = [(s.colour, s.shape) for s in specs]
    assert all(pairs.count((c, s)) == 3 for c in COLOURS for s in SHAPES)
    assert HELD_OUT <= set(pairs)
    for attr, values in (("size", SIZES), ("position", POSITIONS), ("background", COLOURS)):
        assert {getattr(s, attr) for s in specs} == set(values)
    acc = score([classify(s.render()) for s in specs], specs)
    assert acc["all"] == 1.0, acc
