"""
The native layout, this project's own: one folder

    config.json            {"format": "sd-from-scratch", "format_version": 1, "text_encoder": {...}, "vae": {...},
                            "unet": {...} [, "text_encoder_2": {...}, "force_zeros_for_empty_prompt": true]}
                           (each network's config.to_dict(); SDXL has the second text encoder)
    text_encoder.safetensors, vae.safetensors, unet.safetensors [, text_encoder_2.safetensors]   (native keys)
    vocab.json, merges.txt (or tokenizer.json) [, tokenizer_config.json] [, tokenizer_2/], scheduler_config.json
"""

import json
from pathlib import Path

from safetensors.torch import save_file

from model.clip import CLIPTextConfig, CLIPTextModel
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

from .files import Components, WeightsError, find_tokenizer, load_model, read_json, read_state_dict, tensors

FORMAT = "sd-from-scratch"
FORMAT_VERSION = 1


def load_native(path, device, dtype, tokenizer):
    config = read_json(path / "config.json")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{path / 'config.json'}: format_version {config['format_version']} is newer than "
                           f"this code reads ({FORMAT_VERSION})")
    models = {}
    for name, cls, config_cls in (("text_encoder", CLIPTextModel, CLIPTextConfig),
                                  ("text_encoder_2", CLIPTextModel, CLIPTextConfig),
                                  ("vae", AutoencoderKL, VAEConfig), ("unet", UNet, UNetConfig)):
        if name == "text_encoder_2" and name not in config:  # one text encoder (SD 1.x, 2.x)
            continue
        try:
            model_config = config_cls(**config[name])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path / 'config.json'}: bad or missing {name} config: {e!r}") from e
        file = path / f"{name}.safetensors"
        models[name] = load_model(cls, model_config, read_state_dict(file), file, device, dtype)
    scheduler = path / "scheduler_config.json"
    second = {"tokenizer_2": find_tokenizer(None, [path / "tokenizer_2"], path)} if "text_encoder_2" in models else {}
    return Components(tokenizer=find_tokenizer(tokenizer, [path], path), **models, **second,
                      scheduler_config=read_json(scheduler) if scheduler.is_file() else {},
                      force_zeros_for_empty_prompt=bool(config.get("force_zeros_for_empty_prompt", False)))


def save_native(components, path):
    """Write components as a native weights folder (see the top of this file); load(path) reads it back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = components
    models = {"text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2, "vae": c.vae, "unet": c.unet}
    models = {name: model for name, model in models.items() if model is not None}
    for name, model in models.items():
        save_file(tensors(model), str(path / f"{name}.safetensors"), metadata={"format": "pt"})
    if c.tokenizer is not None:
        c.tokenizer.save(path)
    if c.tokenizer_2 is not None:
        c.tokenizer_2.save(path / "tokenizer_2")
    (path / "scheduler_config.json").write_text(json.dumps(c.scheduler_config or {}, indent=2) + "\n")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              **{name: model.config.to_dict() for name, model in models.items()}}
    if c.text_encoder_2 is not None:
        config["force_zeros_for_empty_prompt"] = c.force_zeros_for_empty_prompt
    # written last: a folder is only recognised as native once everything else is there
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

