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


# -----------------------------------------------------------------------------
# help texts and progress bars


@pytest.mark.parametrize("command", [None, "generate", "inpaint", "convert", "train", "eval", "serve", "worker"])
def test_every_help_ends_with_examples(command, capsys):
    from service.cli import main

    with pytest.raises(SystemExit) as done:
        main(([command] if command else []) + ["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    examples = text.split("\nexamples:\n", 1)[1]  # an "examples:" section after the options
    assert f"  sd {command or 'generate'} " in examples


def test_help_lists_the_pipeline_samplers(capsys):
    from model.samplers import SAMPLERS
    from service.cli import SAMPLER_NAMES

    assert SAMPLER_NAMES == ", ".join(SAMPLERS)


class Terminal:
    """Stands a pseudo-terminal (100 columns) in for stderr, as when `sd` runs in a shell: what it showed
    is in .shown after the `with`. A thread drains it, so a long output never blocks the writer."""

    def __enter__(self):
        import fcntl
        import os
        import pty
        import struct
        import termios
        import threading

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.file, self.chunks = os.fdopen(slave, "w", buffering=1), []

        def drain():
            while True:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the terminal was closed
                    return
                if not chunk:
                    return
                self.chunks.append(chunk)

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        self.saved, sys.stderr = sys.stderr, self.file
        return self

    def __exit__(self, *exc):
        import os

        sys.stderr = self.saved
        self.file.close()
        self.reader.join(10)
        os.close(self.master)
        self.shown = b"".join(self.chunks).decode(errors="replace")


def test_progress_bars_go_to_the_terminal_on_stderr(weights, tmp_path, capsys):
    from service.cli import main

    assert not sys.stderr.isatty()  # the runs below see a terminal only through Terminal
    with Terminal() as term:
        assert main(["generate", "--prompt", "a red circle", "--weights", str(weights), "--steps", "3",
                     "--seed", "7", "--out", str(tmp_path / "t.png")]) == 0
    assert "txt2img: 100%" in term.shown and "3/3" in term.shown   # the bar, finished, on stderr
    assert capsys.readouterr().out == f"{tmp_path / 't.png'}  seed=7\n"  # stdout: only the result, for scripts

    Image.new("RGB", (16, 16), "red").save(tmp_path / "in.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "mask.png")
    with Terminal() as term:
        assert main(["inpaint", "--input-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                     "--prompt", "x", "--weights", str(weights), "--steps", "2", "--strength", "1", "--seed", "1",
                     "--out", str(tmp_path / "i.png")]) == 0
    assert "inpaint: 100%" in term.shown and "2/2" in term.shown
    assert capsys.readouterr().out == f"{tmp_path / 'i.png'}  seed=1\n"

    with Terminal() as term:
        assert main(["generate", "--prompt", "x", "--weights", str(weights), "--steps", "3", "--quiet",
                     "--out", str(tmp_path / "q.png")]) == 0
    assert term.shown == ""
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'q.png'}  seed=")

    # not a terminal (a log file, a pipe): no bar
    assert main(["generate", "--prompt", "x", "--weights", str(weights), "--steps", "3",
                 "--out", str(tmp_path / "p.png")]) == 0
    assert capsys.readouterr().err == ""


def test_train_shows_a_bar_per_phase(tmp_path, capsys):
    import yaml

    from service.cli import main
    from test_train import MICRO

    config = {**MICRO, "vae_training": {**MICRO["vae_training"], "steps": 3},
              "diffusion_training": {**MICRO["diffusion_training"], "steps": 4}, "sample_prompts": 0,
              "checkpoint_every": 100}
    (tmp_path / "micro.yaml").write_text(yaml.safe_dump(config))
    with Terminal() as term:
        assert main(["train", "--config", str(tmp_path / "micro.yaml"), "--out", str(tmp_path / "run")]) == 0
    assert "vae: 100%" in term.shown and "3/3" in term.shown
    assert "diffusion: 100%" in term.shown and "4/4" in term.shown and "loss=" in term.shown
    assert capsys.readouterr().out == ""
    assert (tmp_path / "run" / "weights").is_dir()
