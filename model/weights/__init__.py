"""
Loading and saving Stable Diffusion weights (SD 1.x, SD 2.x, SDXL): text encoder(s), VAE, UNet, tokenizer(s)
and scheduler config. load(path) tells the three layouts apart by looking at the path; each has its module:

  native.py      this project's folder: config.json with "format": "sd-from-scratch" and one safetensors file
                 a network
  diffusers.py   a diffusers-layout folder: model_index.json, unet/ vae/ text_encoder/ tokenizer/ [..._2/]
  original.py    one original (CompVis / Stability / AUTOMATIC1111) checkpoint file, .safetensors or .ckpt,
                 of any of the three families, its configs inferred from tensor shapes
  files.py       what they share: reading files safely, strict loading, tokenizers

Every load is strict: the weights must hold exactly the keys and shapes the model expects, else WeightsError
names the file and the offending keys. Pickles (.ckpt, .bin) are only ever read with
torch.load(weights_only=True), which refuses to run code.
"""

from pathlib import Path

import torch

from .diffusers import load_diffusers
from .files import Components, WeightsError, as_dtype, load_model, read_json, read_state_dict
from .native import FORMAT, FORMAT_VERSION, load_native, save_native
from .original import (CLIP_PREFIX, SD1_SCHEDULER_CONFIG, UNET_PREFIX, VAE_PREFIX, clip_key_to_original,
                       infer_clip_config, infer_unet_config, infer_vae_config, load_original, save_original,
                       unet_key_to_original, vae_key_to_original)

__all__ = ["Components", "WeightsError", "load", "detect_layout", "convert", "save_native", "save_original",
           "read_state_dict", "load_model", "FORMAT", "FORMAT_VERSION", "SD1_SCHEDULER_CONFIG",
           "UNET_PREFIX", "VAE_PREFIX", "CLIP_PREFIX", "unet_key_to_original", "vae_key_to_original",
           "clip_key_to_original", "infer_unet_config", "infer_vae_config", "infer_clip_config"]


def detect_layout(path):
    """'native', 'diffusers' or 'single_file' for a path, or WeightsError saying what was expected."""
    path = Path(path)
    if path.is_file():
        return "single_file"
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    config = path / "config.json"
    if config.is_file():
        d = read_json(config)
        if isinstance(d, dict) and d.get("format") == FORMAT:
            return "native"
    if (path / "unet" / "config.json").is_file():
        return "diffusers"
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if index:  # a diffusers pipeline of another kind (SD3, Flux, ...: a transformer/ instead of a unet/)
        raise WeightsError(f"{path}: a diffusers {index.get('_class_name', 'pipeline')} without a unet/: not a "
                           f"family this project runs (SD 1.x, 2.x, SDXL)")
    raise WeightsError(f"{path}: not a weights folder: expected config.json with \"format\": \"{FORMAT}\" (native) "
                       f"or model_index.json with unet/ vae/ text_encoder/ tokenizer/ subfolders (diffusers)")


def load(path, *, device="cpu", dtype=torch.float32, tokenizer=None):
    """
    Tokenizer(s), text encoder(s), VAE, UNet (on device, in dtype, eval mode) and scheduler config from a native
    folder, a diffusers-layout folder or one original checkpoint file of SD 1.x, SD 2.x or SDXL. tokenizer (a
    folder with vocab.json + merges.txt or tokenizer.json, or a CLIPTokenizer) replaces the one stored with the
    weights; single files have none, so it is then required unless those files (or tokenizer/) sit beside the
    file (SDXL's second: tokenizer_2/ beside it, else the first with the pad token OpenCLIP uses). A single
    file's scheduler config is its family's training schedule (model/weights/original.py, FAMILIES).
    """
    path = Path(path)
    dtype = as_dtype(dtype)
    layout = detect_layout(path)
    if layout == "native":
        return load_native(path, device, dtype, tokenizer)
    if layout == "diffusers":
        return load_diffusers(path, device, dtype, tokenizer)
    return load_original(path, device, dtype, tokenizer)

def convert(src, dst, tokenizer=None, dtype=torch.float32):
    """Any supported layout at src -> a native folder at dst (the `sd convert SRC DST` command)."""
    save_native(load(src, dtype=dtype, tokenizer=tokenizer), dst)
