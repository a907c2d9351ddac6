"""
model/compiled.py and `sd compile`: the UNet compiled ahead of time for this machine, one AOTInductor package per
input shape, loaded without compiling and run on the eager UNet's own weights. One tiny package is compiled
here (about half a minute); whether a package is used was measured when it was built, so this test sets it.
"""

import json
import shutil

import numpy as np
import torch

from model import Request, StableDiffusion, compiled
from model.tuning import machine_name


def pixels(img):
    return np.asarray(img.convert("RGB")).astype(np.int16)


def test_packages_are_built_for_this_machine_loaded_and_used_for_their_shape(tmp_path, tiny_weights):
    from service.cli import main

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    assert main(["compile", str(weights), "--sizes", "16x16,12x16", "--batch", "1"]) == 2   # 12: not a multiple of 8
    assert main(["compile", str(weights), "--batch", "0"]) == 2
    assert main(["compile", str(weights), "--batch", "1"]) == 0
    folder = compiled.packages_dir(weights)
    assert folder.parent == weights / "compiled"
    manifest = json.loads((folder / compiled.MANIFEST).read_text())
    plain = StableDiffusion.from_pretrained(weights)
    assert manifest["machine"] == machine_name() and manifest["torch"] == torch.__version__
    assert manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    assert manifest["weights"] == compiled.weights_id(plain.unet)
    (name, entry), = manifest["packages"].items()
    assert name == "2x4x8x8"                                  # one guided 16x16 image: UNet batch 2, 8x8 latents
    assert (folder / entry["file"]).stat().st_size > 0 and entry["max_diff"] < 1e-4
    assert entry["compiled_ms"] > 0 and entry["eager_ms"] > 0

    entry["use"] = True                                       # measured at build; set here to test the rest
    (folder / compiled.MANIFEST).write_text(json.dumps(manifest))
    pipe = StableDiffusion.from_pretrained(weights).optimize()
    assert isinstance(pipe.compiled, compiled.CompiledUNet)
    a = plain.txt2img("a red circle", steps=3, seed=1)[0]
    b = pipe.txt2img("a red circle", steps=3, seed=1)[0]
    assert pixels(a).std() > 1 and np.abs(pixels(a) - pixels(b)).max() <= 1
    assert pipe.compiled.calls == {"compiled": 3, "eager": 0}
    pipe.generate([Request("a red circle", seed=1), Request("a blue square", seed=2)], steps=2)
    assert pipe.compiled.calls == {"compiled": 3, "eager": 2}  # UNet batch 4: no package, eager
    assert StableDiffusion.from_pretrained(weights).optimize(aot=False).compiled is None

    # what is not for here is not loaded: measured slower, another machine or torch, other weights
    unet = StableDiffusion.from_pretrained(weights).unet
    assert compiled.load(unet, folder) is not None
    for change in ({"use": False}, {"machine": "Other CPU | AVX2 | torch 2.13.0 | 2 threads"},
                   {"torch": "2.99.0"}, {"dtype": "float16"}):
        edited = json.loads(json.dumps(manifest))
        if "use" in change:
            edited["packages"][name]["use"] = False
        else:
            edited.update(change)
        (folder / compiled.MANIFEST).write_text(json.dumps(edited))
        assert compiled.load(unet, folder) is None, change
    (folder / compiled.MANIFEST).write_text(json.dumps(manifest))
    with torch.no_grad():
        unet.conv_in.bias.add_(0.01)
    assert compiled.load(unet, folder) is None
