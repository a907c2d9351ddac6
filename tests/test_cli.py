"""The `sd` command line, run as a user runs it: a subprocess writing real PNG files."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model.pnginfo import read_parameters
from test_pipeline import tiny_reference


def sd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_reference(tmp_path_factory.mktemp("cli"))[1]


def test_help_lists_examples(tmp_path):
    out = sd("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "sd generate --mode text-to-image" in out.stdout and "sd inpaint" in out.stdout


def test_text_to_image_then_image_to_image_then_inpaint(weights, tmp_path):
    out = sd("generate", "--mode", "text-to-image", "--prompt", "a red circle", "--weights", weights,
             "--steps", 3, "--seed", 7, "--out", tmp_path / "t2i.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    params = read_parameters(str(tmp_path / "t2i.png"))
    assert params.startswith("a red circle\n") and "Seed: 7" in params and "Steps: 3" in params

    # --input_image (underscore) is a synonym; several images get numbered files
    out = sd("generate", "--mode", "image-to-image", "--input_image", tmp_path / "t2i.png", "--prompt", "blue",
             "--strength", 0.5, "--steps", 4, "--num-images", 2, "--weights", weights,
             "--out", tmp_path / "i2i.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Denoising strength: 0.5" in read_parameters(str(tmp_path / "i2i-1.png"))

    # inpaint without --mask repaints the transparent pixels and keeps the rest
    rgba = np.asarray(Image.open(tmp_path / "t2i.png").convert("RGBA")).copy()
    rgba[:8, :8, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "holed.png")
    out = sd("inpaint", "--input-image", tmp_path / "holed.png", "--prompt", "a square", "--steps", 2,
             "--weights", weights, "--out", tmp_path / "inp.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = np.asarray(Image.open(tmp_path / "inp.png").convert("RGB"))
    keep = rgba[..., 3] == 255
    assert np.array_equal(result[keep], rgba[..., :3][keep])


def test_bad_argument_is_a_clear_error(weights, tmp_path):
    out = sd("generate", "--prompt", "x", "--width", 30, "--weights", weights, cwd=tmp_path)
    assert out.returncode == 2
    assert "width must be a positive multiple of 8, got 30" in out.stderr
    out = sd("generate", "--mode", "image-to-image", "--prompt", "x", "--weights", weights, cwd=tmp_path)
    assert out.returncode == 2 and "--input-image is required" in out.stderr


def test_convert_to_native_loads_back(weights, tmp_path):
    out = sd("convert", weights, tmp_path / "native", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "native" / "config.json").is_file()
    out = sd("generate", "--prompt", "x", "--steps", 1, "--weights", tmp_path / "native", "--out",
             tmp_path / "n.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = sd("convert", tmp_path / "nothing-here", tmp_path / "x", cwd=tmp_path)
    assert out.returncode == 2 and "nothing-here" in out.stderr
