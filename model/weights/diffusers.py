"""
The diffusers layout: a folder as diffusers' save_pretrained writes it

    model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/ [text_encoder_2/ tokenizer_2/ (SDXL)]
    each model folder: config.json and diffusion_pytorch_model.safetensors | model.safetensors | *.bin (| shards)

Native keys equal diffusers' / transformers' keys (model/unet.py, vae.py, clip.py), so almost nothing is renamed;
the configs come from each config.json through the networks' from_diffusers, which refuse options not
implemented here.
"""

import re

from model.clip import CLIPTextConfig, CLIPTextModel
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

from .files import Components, WeightsError, find_tokenizer, load_model, read_json, read_state_dict

_DIFFUSERS_WEIGHT_FILES = [f"{base}{variant}.{ext}"
                           for ext in ("safetensors", "bin") for variant in ("", ".fp16")
                           for base in ("diffusion_pytorch_model", "model", "pytorch_model")]


def _read_diffusers_weights(folder):
    """The state_dict of one diffusers/transformers model folder (one file, or shards listed by *.index.json)."""
    for name in _DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name), folder / name
        index = folder / f"{name}.index.json"
        if index.is_file():
            state = {}
            for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                state.update(read_state_dict(folder / shard))
            return state, index
    raise WeightsError(f"{folder}: no weights file (looked for {', '.join(_DIFFUSERS_WEIGHT_FILES)})")


def _legacy_vae_names(key):
    """Old diffusers VAE checkpoints name the mid-block attention query/key/value/proj_attn."""
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    m = re.fullmatch(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(\w+)", key)
    return f"{m[1]}{legacy[m[2]]}.{m[3]}" if m else key


def _clip_from_transformers(state):
    """transformers CLIPTextModel keys -> ours: drop 'text_model.' and the position_ids buffer."""
    return {k.removeprefix("text_model."): v for k, v in state.items()
            if k.removeprefix("text_model.") != "embeddings.position_ids"}


def load_diffusers(path, device, dtype, tokenizer):
    def part(name, cls, config_cls, rename=lambda state: state):
        config_file = path / name / "config.json"
        try:
            config = config_cls.from_diffusers(read_json(config_file))
        except WeightsError:
            raise
        except (TypeError, ValueError) as e:                    # an option our model does not implement
            raise WeightsError(f"{config_file}: {e}") from e
        state, file = _read_diffusers_weights(path / name)
        return load_model(cls, config, rename(state), file, device, dtype)

    text_encoder = part("text_encoder", CLIPTextModel, CLIPTextConfig, _clip_from_transformers)
    vae = part("vae", AutoencoderKL, VAEConfig, lambda state: {_legacy_vae_names(k): v for k, v in state.items()})
    unet = part("unet", UNet, UNetConfig)
    scheduler = path / "scheduler" / "scheduler_config.json"
    second = {}
    if (path / "text_encoder_2").is_dir():  # SDXL
        second = {"text_encoder_2": part("text_encoder_2", CLIPTextModel, CLIPTextConfig, _clip_from_transformers),
                  "tokenizer_2": find_tokenizer(None, [path / "tokenizer_2"], path),
                  # diffusers' SDXL pipelines default to True when model_index.json does not say
                  "force_zeros_for_empty_prompt": bool(read_json(path / "model_index.json").get(
                      "force_zeros_for_empty_prompt", True))}
    return Components(tokenizer=find_tokenizer(tokenizer, [path / "tokenizer"], path), text_encoder=text_encoder,
                      vae=vae, unet=unet, scheduler_config=read_json(scheduler) if scheduler.is_file() else {},
                      **second)


# keys of an original checkpoint that are not weights of the three networks: the training noise schedule
