"""
Loading and saving Stable Diffusion 1.x weights: text encoder, VAE, UNet, tokenizer (+ scheduler config).

load(path) understands three layouts and tells them apart by looking at the path:

  native folder     config.json {"format": "sd-from-scratch", "format_version": 1,
                                 "text_encoder": {...}, "vae": {...}, "unet": {...}}   (the three configs' to_dict())
                    text_encoder.safetensors, vae.safetensors, unet.safetensors          (native state_dict keys)
                    vocab.json, merges.txt (or tokenizer.json) [, tokenizer_config.json], scheduler_config.json
  diffusers folder  model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/, each model folder with
                    config.json and diffusion_pytorch_model.safetensors | model.safetensors | *.bin (| sharded)
  one file          an original (CompVis / AUTOMATIC1111) SD 1.x checkpoint, .safetensors or .ckpt:
                    model.diffusion_model.* (UNet), first_stage_model.* (VAE), cond_stage_model.transformer.* (CLIP)

Native keys equal the diffusers / transformers keys (see model/unet.py, vae.py, clip.py), so the diffusers
layout needs almost no renaming. The original layout is renamed with the small rule tables below, and its
configs are inferred from tensor shapes. Every load is strict: the file must hold exactly the keys and
shapes the model expects, else WeightsError names the file and the offending keys. Pickles (.ckpt, .bin)
are only ever read with torch.load(weights_only=True), which refuses to run code.
"""

import json
import mmap
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.clip import CLIPTextConfig, CLIPTextModel
from model.tokenizer import CLIPTokenizer, has_tokenizer
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

FORMAT = "sd-from-scratch"
FORMAT_VERSION = 1

# the noise schedule SD 1.x was trained with (stable-diffusion-v1-5's scheduler_config.json); single files carry none
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "skip_prk_steps": True, "clip_sample": False, "timestep_spacing": "leading",
}


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded: missing, corrupt, unsafe, or not matching the model."""


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet
    scheduler_config: dict      # a diffusers scheduler_config.json dict; {} when the weights carry none
    # SDXL: its second tokenizer and text encoder (OpenCLIP bigG with a projection), and whether an empty
    # negative prompt is zeros rather than the encoded empty string (model_index.json's flag)
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModel | None = None
    force_zeros_for_empty_prompt: bool = False


def _some(keys, n=10):
    """At most n keys for an error message, and how many more there are."""
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more

# -----------------------------------------------------------------------------
# reading weight files


def _file_kind(file):
    """'safetensors' or 'torch' from the extension, else from the first bytes; None if neither."""
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "torch"
    with open(file, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":    # zip (torch.save) or a raw pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":                 # safetensors: u64 header length, then JSON
        return "safetensors"
    return None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(file):
    """
    {key: tensor} of a .safetensors file, copied into memory of their own, the file's pages let go of as soon as
    they are copied. Tensors that stay views of a mapped file keep every page they were read from counted in the
    process' memory while any one tensor of the file lives, so weights replaced after loading (prepacked
    convolutions, model/speed.py) would keep their space; copying with the whole file mapped would need twice
    the memory while loading. safe_open checks the header first (offsets inside the file, no gaps or overlaps).
    """
    with safe_open(str(file), framework="pt") as checked, open(file, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:    # private: writes would not reach the file
        header_len = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8:8 + header_len])
        keys = list(checked.keys())
        state, released = {}, 0
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):     # in file order
            info = header[key]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:                                  # rare dtypes (fp8, ...): safetensors' own reader
                state[key] = checked.get_tensor(key).clone()
                continue
            begin, end = (8 + header_len + offset for offset in info["data_offsets"])
            tensor = torch.empty(info["shape"], dtype=dtype)
            if end > begin:    # torch's copy (all threads) from a view of the pages, which are never written
                pages = torch.from_numpy(np.frombuffer(mapped, np.uint8, end - begin, begin))
                tensor.view(-1).view(torch.uint8).copy_(pages)
                del pages      # no view may outlive the mapping
            state[key] = tensor
            copied = end // mmap.PAGESIZE * mmap.PAGESIZE     # pages before this one are not read again
            if copied > released and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED, released, copied - released)   # still in the page cache
                released = copied
    return {key: state[key] for key in keys}


def read_state_dict(file):
    """
    All tensors of one weights file as {key: CPU tensor}: .safetensors, or a torch file (.ckpt/.pt/.bin)
    read with torch.load(weights_only=True) and unwrapped from a {"state_dict": ...} checkpoint.
    """
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    kind = _file_kind(file)
    if kind == "safetensors":
        try:
            return _read_safetensors(file)
        except Exception as e:
            raise WeightsError(f"{file}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
    if kind == "torch":
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" in str(e).lower():   # torch's long message; keep its reason
                reason = " ".join(line.strip() for line in str(e).splitlines()[1:]
                                  if line.strip() and not line.startswith(("Please file", "Check the doc")))
                raise WeightsError(f"{file}: refused to unpickle: it holds something other than tensors, "
                                   f"which could run code ({reason}). Use a .safetensors file instead.") from e
            raise WeightsError(f"{file}: not a readable checkpoint: {e}") from e
        except Exception as e:
            raise WeightsError(f"{file}: not a readable checkpoint (truncated or corrupt?): {e}") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
            raise WeightsError(f"{file}: not a checkpoint: expected a dict of tensors (or {{'state_dict': ...}})")
        return obj
    raise WeightsError(f"{file}: not a checkpoint (neither a .safetensors nor a torch file)")


def _read_json(file):
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{file}: no such file") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{file}: not a readable JSON file: {e}") from e

# -----------------------------------------------------------------------------
# building a model from a config and a state_dict


def _dtype(dtype):
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
        return names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not float32, float16 or bfloat16")
    return dtype


def _expected_state(cls, config):
    """The state_dict a cls(config) would have, as meta tensors (no memory, no init)."""
    with torch.device("meta"):
        return cls(config).state_dict()


def load_model(cls, config, state, source, device="cpu", dtype=torch.float32, names=None):
    """
    cls(config) holding the tensors of state (native keys), on device in dtype, in eval mode.
    state must have exactly the expected keys and shapes, else WeightsError naming source and the keys
    (as names[key], the key's name in the file, when a names dict is given).
    """
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    name = (lambda k: names.get(k, k)) if names else (lambda k: k)
    problems = []
    missing = [name(k) for k in expected if k not in state]
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    unexpected = [name(k) for k in state if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    wrong = [f"{name(k)} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        problems.append(f"wrong shapes: {_some(wrong)}")
    if problems:
        raise WeightsError(f"{source}: {cls.__name__} weights do not fit its config: " + "; ".join(problems))

    dtype = _dtype(dtype)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)     # the meta tensors are replaced by these
    if any(t.is_meta for t in model.buffers()):                 # a non-persistent buffer: build it for real
        with torch.device(device):
            model = cls(config).to(dtype)
        model.load_state_dict(state, strict=True)
    return model.eval()

# -----------------------------------------------------------------------------
# original single-file key names
#
# Each function maps one native key to its name in an original checkpoint (below the component's prefix):
# a list of (native pattern, original name) rules, the first full match wins. Loading inverts the map
# over the keys the model expects, so a file loads exactly when it holds the original name of every key.

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."     # then "text_model." (current transformers) or not (old)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key, rules):
    for pattern, rename in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return rename(m)
    raise KeyError(f"no original name for {key!r}")


def unet_key_to_original(key, config):
    """
    UNet key -> original name. The original UNet numbers its blocks flat: input_blocks.0 is conv_in, then
    each down level b has L = layers_per_block blocks [resnet, attention] and (but the last) one downsampler,
    middle_block is [resnet, attention, resnet], and output_blocks has L + 1 blocks per up level
    [resnet, attention, upsampler], the upsampler at index 1 when the level has no attention.
    """
    L = config.layers_per_block
    up_attention = list(reversed(config.attention_levels))      # up level b mirrors down level n-1-b

    def resnet(rest):                                           # "conv1.weight" -> "in_layers.2.weight"
        module, param = rest.rsplit(".", 1)
        return f"{_UNET_RESNET[module]}.{param}"

    return _rename(key, [
        (r"time_embedding\.linear_1\.(\w+)", lambda m: f"time_embed.0.{m[1]}"),
        (r"time_embedding\.linear_2\.(\w+)", lambda m: f"time_embed.2.{m[1]}"),
        (r"conv_in\.(\w+)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{resnet(m[3])}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{resnet(m[3])}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
         lambda m: f"output_blocks.{int(m[1]) * (L + 1) + L}.{2 if up_attention[int(m[1])] else 1}.conv.{m[2]}"),
        (r"conv_norm_out\.(\w+)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(\w+)", lambda m: f"out.2.{m[1]}"),
    ])


def vae_key_to_original(key, config):
    """
    VAE key -> original name: down_blocks/up_blocks are down/up with resnets called block, the decoder's
    up levels are numbered from the lowest resolution in the original, mid-block parts are block_1,
    attn_1, block_2, and the attention's projections are q, k, v, proj_out (1x1 convs there).
    """
    n = len(config.block_out_channels)

    def resnet(rest):
        return rest.replace("conv_shortcut", "nin_shortcut")

    return _rename(key, [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(\w+)", lambda m: m[0]),
        (r"(post_quant_conv|quant_conv)\.(\w+)", lambda m: m[0]),
        (r"(encoder|decoder)\.conv_norm_out\.(\w+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
         lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)",
         lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"),
    ])


def _is_vae_attention_weight(original_key):
    """The original VAE attention's q, k, v, proj_out are 1x1 convs: weights [C, C, 1, 1], ours [C, C]."""
    return re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", original_key) is not None


def clip_key_to_original(key, config=None):
    """CLIP key -> original name (below cond_stage_model.transformer.): transformers' CLIPTextModel keys."""
    return "text_model." + key

# -----------------------------------------------------------------------------
# configs of an original checkpoint, from its tensor shapes (SD 1.x conventions where shapes say nothing)


def _count(state, prefix):
    """How many distinct indices i there are in keys 'prefix{i}.<...>'."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def infer_unet_config(state):
    """UNetConfig from original UNet keys (without model.diffusion_model.). Heads: 8 on every level (SD 1.x)."""
    blocks = _count(state, "input_blocks.")                     # 1 + n * (L + 1) - 1 (no downsampler at the end)
    downsamplers = sorted(int(k.split(".")[1]) for k in state
                          if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    L = downsamplers[0] - 1 if downsamplers else blocks - 1
    n = blocks // (L + 1)
    first = [1 + b * (L + 1) for b in range(n)]                  # the first input block of each level
    return UNetConfig(
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        out_channels=state["out.2.weight"].shape[0],
        block_out_channels=tuple(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first),
        layers_per_block=L,
        attention_levels=tuple(f"input_blocks.{i}.1.proj_in.weight" in state for i in first),
        cross_attention_dim=state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2,
    )


def infer_vae_config(state):
    """VAEConfig from original VAE keys (without first_stage_model.)."""
    n = _count(state, "encoder.down.")
    return VAEConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["post_quant_conv.weight"].shape[0],
        block_out_channels=tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n)),
        layers_per_block=_count(state, "encoder.down.0.block."),
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=512,
    )


def infer_clip_config(state):
    """CLIPTextConfig from CLIP keys (native names). Heads: hidden / 64 (OpenAI CLIP)."""
    vocab_size, hidden = state["embeddings.token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(state, "encoder.layers."),
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )

# -----------------------------------------------------------------------------
# tokenizer


def _tokenizer(tokenizer, folders, source):
    """The tokenizer= argument (a CLIPTokenizer or a folder), else the first folder with vocab.json + merges.txt
    or tokenizer.json."""
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    if tokenizer is not None:
        folders = [Path(tokenizer)]
    for folder in folders:
        if has_tokenizer(folder):
            return CLIPTokenizer.from_dir(folder)
    where = " or ".join(str(f) for f in folders)
    raise WeightsError(f"{source}: no tokenizer: found neither vocab.json + merges.txt nor tokenizer.json in "
                       f"{where}. Pass tokenizer= (a folder with them, e.g. the tokenizer/ folder of "
                       f"stable-diffusion-v1-5, or a CLIPTokenizer)")

# -----------------------------------------------------------------------------
# the three layouts


def _load_native(path, device, dtype, tokenizer):
    config = _read_json(path / "config.json")
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
    second = {"tokenizer_2": _tokenizer(None, [path / "tokenizer_2"], path)} if "text_encoder_2" in models else {}
    return Components(tokenizer=_tokenizer(tokenizer, [path], path), **models, **second,
                      scheduler_config=_read_json(scheduler) if scheduler.is_file() else {},
                      force_zeros_for_empty_prompt=bool(config.get("force_zeros_for_empty_prompt", False)))


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
            for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
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


def _load_diffusers(path, device, dtype, tokenizer):
    def part(name, cls, config_cls, rename=lambda state: state):
        config_file = path / name / "config.json"
        try:
            config = config_cls.from_diffusers(_read_json(config_file))
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
                  "tokenizer_2": _tokenizer(None, [path / "tokenizer_2"], path),
                  # diffusers' SDXL pipelines default to True when model_index.json does not say
                  "force_zeros_for_empty_prompt": bool(_read_json(path / "model_index.json").get(
                      "force_zeros_for_empty_prompt", True))}
    return Components(tokenizer=_tokenizer(tokenizer, [path / "tokenizer"], path), text_encoder=text_encoder,
                      vae=vae, unet=unet, scheduler_config=_read_json(scheduler) if scheduler.is_file() else {},
                      **second)


# keys of an original checkpoint that are not weights of the three networks: the training noise schedule
# (recomputed from scheduler_config), EMA copies of the UNet (model.diffusion_model.* is used, as in
# diffusers by default), and CLIP's position_ids buffer.
_IGNORED_ORIGINAL_KEYS = re.compile(
    r"model_ema\..*|betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights"
    r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids")


def _load_original_part(state, prefix, cls, infer_config, to_original, file, device, dtype):
    """One network of an original checkpoint: its keys below prefix, renamed to native keys and loaded."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        config = infer_config(part)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        reason = f"no key {prefix + e.args[0]}" if isinstance(e, KeyError) else str(e)
        raise WeightsError(f"{file}: not an SD 1.x {cls.__name__}: cannot infer its config ({reason})") from e
    to_native = {to_original(k, config): k for k in _expected_state(cls, config)}
    unexpected = [prefix + k for k in part if k not in to_native]
    if unexpected:
        raise WeightsError(f"{file}: {cls.__name__} weights do not fit its config: unexpected keys: "
                           f"{_some(unexpected)}")
    native = {}
    for k, v in part.items():
        if _is_vae_attention_weight(k) and cls is AutoencoderKL and v.ndim == 4:
            v = v[:, :, 0, 0]                                   # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        native[to_native[k]] = v
    names = {native_key: prefix + original for original, native_key in to_native.items()}
    return load_model(cls, config, native, file, device, dtype, names=names)


# what an original single file of another family looks like: (a key prefix it has, what it is, what to do)
_OTHER_FAMILIES = [
    ("conditioner.embedders.1.model.", "an SDXL checkpoint (two text encoders, conditioner.embedders.*)",
     "SDXL single files are not supported yet: load its diffusers folder (diffusers' from_single_file, then "
     "save_pretrained, makes one)"),
    ("cond_stage_model.model.", "an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*)",
     "SD 2.x single files are not supported yet: load its diffusers folder"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint (MMDiT, joint_blocks.*)",
     "SD3 is not a family this project runs (SD 1.x, 2.x, SDXL)"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint (double_blocks.*)",
     "Flux is not a family this project runs (SD 1.x, 2.x, SDXL)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks.*)",
     "Flux is not a family this project runs (SD 1.x, 2.x, SDXL)"),
]


def _load_single_file(file, device, dtype, tokenizer):
    state = read_state_dict(file)
    for prefix, looks, advice in _OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in state):
            raise WeightsError(f"{file}: looks like {looks}; {advice}")
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (CLIP_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in state):
            raise WeightsError(f"{file}: not an SD 1.x checkpoint: no {what} keys ({prefix}*); "
                               f"found {_some(sorted(state))}")
    clip_prefix = CLIP_PREFIX + "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in state) \
        else CLIP_PREFIX
    unknown = [k for k in state if not k.startswith((UNET_PREFIX, VAE_PREFIX, clip_prefix))
               and not _IGNORED_ORIGINAL_KEYS.fullmatch(k)]
    if unknown:
        raise WeightsError(f"{file}: unexpected keys: {_some(unknown)}")
    state = {k: v for k, v in state.items() if not _IGNORED_ORIGINAL_KEYS.fullmatch(k)}

    unet = _load_original_part(state, UNET_PREFIX, UNet, infer_unet_config, unet_key_to_original,
                               file, device, dtype)
    vae = _load_original_part(state, VAE_PREFIX, AutoencoderKL, infer_vae_config, vae_key_to_original,
                              file, device, dtype)
    text_encoder = _load_original_part(state, clip_prefix, CLIPTextModel, infer_clip_config, lambda k, c: k,
                                       file, device, dtype)
    tok = _tokenizer(tokenizer, [file.parent, file.parent / "tokenizer"], file)
    return Components(tokenizer=tok, text_encoder=text_encoder, vae=vae, unet=unet,
                      scheduler_config=dict(SD1_SCHEDULER_CONFIG))


def detect_layout(path):
    """'native', 'diffusers' or 'single_file' for a path, or WeightsError saying what was expected."""
    path = Path(path)
    if path.is_file():
        return "single_file"
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    config = path / "config.json"
    if config.is_file():
        d = _read_json(config)
        if isinstance(d, dict) and d.get("format") == FORMAT:
            return "native"
    if (path / "unet" / "config.json").is_file():
        return "diffusers"
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if index:  # a diffusers pipeline of another kind (SD3, Flux, ...: a transformer/ instead of a unet/)
        raise WeightsError(f"{path}: a diffusers {index.get('_class_name', 'pipeline')} without a unet/: not a "
                           f"family this project runs (SD 1.x, 2.x, SDXL)")
    raise WeightsError(f"{path}: not a weights folder: expected config.json with \"format\": \"{FORMAT}\" (native) "
                       f"or model_index.json with unet/ vae/ text_encoder/ tokenizer/ subfolders (diffusers)")


def load(path, *, device="cpu", dtype=torch.float32, tokenizer=None):
    """
    Tokenizer, text encoder, VAE, UNet (on device, in dtype, eval mode) and scheduler config from a native
    folder, a diffusers-layout folder or one original SD 1.x checkpoint file. tokenizer (a folder with
    vocab.json + merges.txt or tokenizer.json, or a CLIPTokenizer) replaces the one stored with the weights;
    single files have none, so it is then required unless those files (or tokenizer/) sit beside the file.
    A single file's scheduler config is SD 1.x's training schedule, SD1_SCHEDULER_CONFIG.
    """
    path = Path(path)
    dtype = _dtype(dtype)
    layout = detect_layout(path)
    if layout == "native":
        return _load_native(path, device, dtype, tokenizer)
    if layout == "diffusers":
        return _load_diffusers(path, device, dtype, tokenizer)
    return _load_single_file(path, device, dtype, tokenizer)

# -----------------------------------------------------------------------------
# saving


def _tensors(model):
    """A model's state_dict as contiguous CPU tensors, as safetensors wants them."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_native(components, path):
    """Write components as a native weights folder (see the top of this file); load(path) reads it back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = components
    models = {"text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2, "vae": c.vae, "unet": c.unet}
    models = {name: model for name, model in models.items() if model is not None}
    for name, model in models.items():
        save_file(_tensors(model), str(path / f"{name}.safetensors"), metadata={"format": "pt"})
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


def save_original(components, file):
    """
    Write the three networks as one original SD 1.x checkpoint (.safetensors), the layout of
    v1-5-pruned-emaonly.safetensors, readable by diffusers' from_single_file, AUTOMATIC1111 and ComfyUI.
    The tokenizer and scheduler config are not stored (single files have none).
    """
    file = Path(file)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: save_original writes safetensors; name the file *.safetensors")
    if components.text_encoder_2 is not None:
        raise ValueError(f"{file}: save_original writes SD 1.x single files; an SDXL one is not supported yet")
    c = components
    state = {}
    for k, v in _tensors(c.unet).items():
        state[UNET_PREFIX + unet_key_to_original(k, c.unet.config)] = v
    for k, v in _tensors(c.vae).items():
        original = vae_key_to_original(k, c.vae.config)
        state[VAE_PREFIX + original] = v[:, :, None, None].contiguous() if _is_vae_attention_weight(original) else v
    for k, v in _tensors(c.text_encoder).items():
        state[CLIP_PREFIX + clip_key_to_original(k)] = v
    # real SD 1.x files carry CLIP's position_ids buffer; some readers look for it
    T = c.text_encoder.config.max_position_embeddings
    state[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(T)[None]
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(file), metadata={"format": "pt"})


def convert(src, dst, tokenizer=None, dtype=torch.float32):
    """Any supported layout at src -> a native folder at dst (the `sd convert SRC DST` command)."""
    save_native(load(src, dtype=dtype, tokenizer=tokenizer), dst)
