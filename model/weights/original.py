"""
Original single-file checkpoints: the layout of the files Stability released, as the web UI and ComfyUI use
them (v1-5-pruned-emaonly, v2-1_768-ema-pruned, sd_xl_base_1.0), .safetensors or .ckpt.

    prefix                                  network             key style
    model.diffusion_model.                  UNet                CompVis: flat input_blocks / middle_block /
                                                                output_blocks, SDXL's label_emb
    first_stage_model.                      VAE                 CompVis: encoder.down / decoder.up, mid.attn_1
    SD 1.x  cond_stage_model.transformer.   CLIP ViT-L          transformers' CLIPTextModel (text_model. or not)
    SD 2.x  cond_stage_model.model.         OpenCLIP ViT-H      OpenCLIP: transformer.resblocks.N with q, k, v
                                                                fused in attn.in_proj_weight
    SDXL    conditioner.embedders.0.transformer.  CLIP ViT-L    transformers'
            conditioner.embedders.1.model.        OpenCLIP bigG OpenCLIP, with its text_projection

Each function *_key_to_original maps one native key to its name in the file (below the network's prefix): a
list of (native pattern, original name) rules, the first full match wins. Loading inverts the map over the
keys the model expects, so a file loads exactly when it holds the original name of every key. OpenCLIP's
fused q/k/v are split (and fused again when saving) before the names are mapped.

The files carry no configs. Each network's config is inferred from tensor shapes; what shapes cannot tell
(head counts, native size, noise schedule) follows the family's published configs: FAMILIES below.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from model.clip import CLIPTextConfig, CLIPTextModel
from model.tokenizer import CLIPTokenizer
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig

from .files import Components, WeightsError, expected_state, find_tokenizer, load_model, read_state_dict, some, \
    tensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."     # SD 1.x; then "text_model." (current transformers) or not (old)

# -----------------------------------------------------------------------------
# the families: what a file's shapes cannot say, from each family's published configs

# the noise schedules the families were trained with (their scheduler_config.json on the hub)
_SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1,
                  "clip_sample": False, "skip_prk_steps": True}
SD1_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", **_SCALED_LINEAR, "prediction_type": "epsilon",
                        "timestep_spacing": "leading"}                    # stable-diffusion-v1-5
SD2_SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", **_SCALED_LINEAR, "prediction_type": "v_prediction",
                        "timestep_spacing": "leading"}  # (the published one says none: DDIM's default, leading)
SDXL_SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", **_SCALED_LINEAR, "prediction_type": "epsilon",
                         "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}


@dataclass(frozen=True)
class TextTower:
    """One text encoder of a file: where its keys are and how they are written."""
    prefix: str               # below which its keys are
    style: str                # "transformers" (CLIPTextModel's keys) or "openclip" (resblocks, fused q/k/v)
    hidden_act: str           # quick_gelu (OpenAI CLIP) or gelu (OpenCLIP)
    projection: bool = False  # its text_projection is used (SDXL's bigG: the pooled embedding)
    max_layers: int = 0       # load at most this many layers (0: all). SD 2.x conditions on ViT-H's penultimate
                              # layer, so its 24th (resblocks.23) is never run: diffusers leaves it out, as here
    pad_token: str = ""       # the pad token its tokenizer must use ("": the tokenizer's own); OpenCLIP pads with 0


@dataclass(frozen=True)
class Family:
    name: str
    towers: tuple                      # TextTower per text encoder, in the pipeline's order
    native_size: int                   # image side it was trained at
    scheduler_config: dict = field(hash=False)
    unet_head_size: int = 0            # heads = channels // this on every level; 0: 8 heads a level (SD 1.x)
    upcast_attention: bool = False
    vae_scaling_factor: float = 0.18215
    force_zeros_for_empty_prompt: bool = False


SD1 = Family("SD 1.x", (TextTower(CLIP_PREFIX, "transformers", "quick_gelu"),), 512, SD1_SCHEDULER_CONFIG)
SD2 = Family("SD 2.x", (TextTower("cond_stage_model.model.", "openclip", "gelu", max_layers=23, pad_token="!"),),
             768, SD2_SCHEDULER_CONFIG, unet_head_size=64, upcast_attention=True)
# SD 2.x-base (512, epsilon) and the 2.x inpainting model: the same networks, another schedule and size
SD2_BASE = Family("SD 2.x (512, epsilon)", SD2.towers, 512, {**SD2_SCHEDULER_CONFIG, "prediction_type": "epsilon"},
                  unet_head_size=64, upcast_attention=True)
SDXL = Family("SDXL", (TextTower("conditioner.embedders.0.transformer.", "transformers", "quick_gelu"),
                       TextTower("conditioner.embedders.1.model.", "openclip", "gelu", projection=True,
                                 pad_token="!")),
              1024, SDXL_SCHEDULER_CONFIG, unet_head_size=64, vae_scaling_factor=0.13025,
              force_zeros_for_empty_prompt=True)
FAMILIES = (SD1, SD2, SDXL)

# what a file of a family this project does not run looks like: (a key prefix it has, what it is, what to do)
_OTHER_FAMILIES = [
    ("conditioner.embedders.0.model.", "an SDXL refiner checkpoint (one OpenCLIP bigG text encoder, "
     "conditioner.embedders.0.model.*)", "the SDXL refiner is not supported (SDXL base and its fine-tunes are)"),
    ("model.diffusion_model.joint_blocks.", "an SD3 checkpoint (MMDiT, joint_blocks.*)",
     "SD3 is not a family this project runs (SD 1.x, 2.x, SDXL)"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint (double_blocks.*)",
     "Flux is not a family this project runs (SD 1.x, 2.x, SDXL)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks.*)",
     "Flux is not a family this project runs (SD 1.x, 2.x, SDXL)"),
]


def detect_family(state, file):
    """The Family whose text encoder keys the file has, or WeightsError naming what it looks like."""
    for prefix, looks, advice in _OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in state) and not any(k.startswith(SDXL.towers[1].prefix) for k in state):
            raise WeightsError(f"{file}: looks like {looks}; {advice}")
    found = [f for f in FAMILIES if any(k.startswith(f.towers[-1].prefix) for k in state)]
    if len(found) > 1:
        raise WeightsError(f"{file}: holds text encoder keys of several families: " +
                           ", ".join(f"{f.name} ({f.towers[-1].prefix}*)" for f in found))
    if not found:
        raise WeightsError(f"{file}: not an SD 1.x, 2.x or SDXL checkpoint: no text encoder keys ("
                           + ", ".join(f"{f.towers[-1].prefix}*" for f in FAMILIES) + f"); found {some(sorted(state))}")
    return found[0]


def _sd2_variant(file, unet_in_channels):
    """
    SD 2.x's v-prediction 768 model, or the 512 epsilon one (2.x-base, and the inpainting model), which share
    every shape. As diffusers' from_single_file: v-prediction, but the 9-channel inpainting UNet. A YAML config
    beside the file (the web UI's convention, model.yaml for model.safetensors) decides when there is one:
    `parameterization: "v"` (v2-inference-v.yaml) or none (v2-inference.yaml: epsilon).
    """
    config = Path(file).with_suffix(".yaml")
    if config.is_file():
        try:
            params = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("params", {})
        except (yaml.YAMLError, AttributeError) as e:
            raise WeightsError(f"{config}: not a readable model config: {e}") from e
        return SD2 if params.get("parameterization") == "v" else SD2_BASE
    return SD2_BASE if unet_in_channels == 9 else SD2

# -----------------------------------------------------------------------------
# key names


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
    SDXL's added (text_time) embedding MLP is label_emb.0.
    """
    L = config.layers_per_block
    up_attention = list(reversed(config.attention_levels))      # up level b mirrors down level n-1-b

    def resnet(rest):                                           # "conv1.weight" -> "in_layers.2.weight"
        module, param = rest.rsplit(".", 1)
        return f"{_UNET_RESNET[module]}.{param}"

    return _rename(key, [
        (r"time_embedding\.linear_1\.(\w+)", lambda m: f"time_embed.0.{m[1]}"),
        (r"time_embedding\.linear_2\.(\w+)", lambda m: f"time_embed.2.{m[1]}"),
        (r"add_embedding\.linear_1\.(\w+)", lambda m: f"label_emb.0.0.{m[1]}"),
        (r"add_embedding\.linear_2\.(\w+)", lambda m: f"label_emb.0.2.{m[1]}"),
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
    """CLIP key -> original name in the transformers style (below cond_stage_model.transformer. for SD 1.x)."""
    return "text_model." + key


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_key_to_original(key, config=None):
    """
    CLIP key -> OpenCLIP name. q_proj, k_proj, v_proj map to one fused in_proj with a ".q" / ".k" / ".v" suffix
    naming its third (rows [q; k; v]): split_fused / fuse_qkv turn a file's tensors into these and back.
    text_projection is OpenCLIP's [hidden, projection] matrix (x @ P), the transpose of our Linear's weight.
    """
    return _rename(key, [
        (r"embeddings\.token_embedding\.weight", lambda m: "token_embedding.weight"),
        (r"embeddings\.position_embedding\.weight", lambda m: "positional_embedding"),
        (r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)",
         lambda m: f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}.{m[2]}"),
        (r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
         lambda m: f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}"),
        (r"final_layer_norm\.(weight|bias)", lambda m: f"ln_final.{m[1]}"),
        (r"text_projection\.weight", lambda m: "text_projection"),
    ])


def split_fused(part):
    """OpenCLIP tensors (below the tower's prefix) with each fused in_proj [3C, ...] split into its .q .k .v
    thirds, and text_projection transposed into a Linear's weight, so that names map one to one."""
    out = {}
    for k, v in part.items():
        if re.fullmatch(r"transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias)", k):
            for name, third in zip("qkv", v.chunk(3)):
                out[f"{k}.{name}"] = third
        elif k == "text_projection":
            out[k] = v.t()
        else:
            out[k] = v
    return out


def fuse_qkv(part):
    """split_fused's inverse: the .q .k .v thirds back into one in_proj, text_projection as OpenCLIP's matrix."""
    out = {}
    for k, v in part.items():
        if k.endswith((".q", ".k", ".v")):
            fused = k[:-2]
            if fused not in out:
                out[fused] = torch.cat([part[f"{fused}.{name}"] for name in "qkv"])
        elif k == "text_projection":
            out[k] = v.t().contiguous()
        else:
            out[k] = v
    return out

# -----------------------------------------------------------------------------
# configs from tensor shapes (the family's conventions where shapes say nothing)


def _count(state, prefix):
    """How many distinct indices i there are in keys 'prefix{i}.<...>'."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def infer_unet_config(state, family=SD1, pooled_dim=None, latent_factor=8):
    """
    UNetConfig from original UNet keys (without model.diffusion_model.). Heads: 8 a level (SD 1.x) or one per
    64 channels (SD 2.x, SDXL), as their published configs. Transformer depth per level from the first attention
    block of each level (the middle block must have the last level's). SDXL's label_emb: pooled_dim (the
    projection width of its text encoder) + 6 sinusoidal embeddings of the size numbers (time_ids).
    sample_size: the family's native image side in latents of the VAE's latent_factor.
    """
    blocks = _count(state, "input_blocks.")                     # 1 + n * (L + 1) - 1 (no downsampler at the end)
    downsamplers = sorted(int(k.split(".")[1]) for k in state
                          if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    L = downsamplers[0] - 1 if downsamplers else blocks - 1
    n = blocks // (L + 1)
    first = [1 + b * (L + 1) for b in range(n)]                  # the first input block of each level
    channels = tuple(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first)
    attention = tuple(f"input_blocks.{i}.1.proj_in.weight" in state for i in first)
    depths = tuple(_count(state, f"input_blocks.{i}.1.transformer_blocks.") if a else 1
                   for i, a in zip(first, attention))
    heads = tuple(max(c // family.unet_head_size, 1) for c in channels) if family.unet_head_size else 8
    text_time = {}
    if "label_emb.0.0.weight" in state:
        width = state["label_emb.0.0.weight"].shape[1]
        if pooled_dim is None or (width - pooled_dim) % 6:
            raise ValueError(f"label_emb.0.0.weight takes {width} inputs: not a pooled text embedding of "
                             f"{pooled_dim} + 6 time ids")
        text_time = dict(addition_embed_type="text_time", addition_time_embed_dim=(width - pooled_dim) // 6,
                         projection_class_embeddings_input_dim=width)
    return UNetConfig(
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        out_channels=state["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=L,
        attention_levels=attention,
        cross_attention_dim=state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        attention_head_dim=heads,
        transformer_layers_per_block=depths if len(set(depths)) > 1 else depths[0],
        norm_num_groups=32,
        sample_size=family.native_size // latent_factor,
        use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2,
        upcast_attention=family.upcast_attention,
        **text_time,
    )


def infer_vae_config(state, family=SD1):
    """VAEConfig from original VAE keys (without first_stage_model.)."""
    n = _count(state, "encoder.down.")
    return VAEConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["post_quant_conv.weight"].shape[0],
        block_out_channels=tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n)),
        layers_per_block=_count(state, "encoder.down.0.block."),
        norm_num_groups=32,
        scaling_factor=family.vae_scaling_factor,
        sample_size=family.native_size,
    )


def infer_clip_config(state, tower=SD1.towers[0], eos_token_id=None, name=lambda key: key):
    """CLIPTextConfig from text encoder keys: name(native key) is the key in state (OpenCLIP's for an OpenCLIP
    tower). Heads: one per 64 channels (OpenAI CLIP and OpenCLIP alike). eos_token_id: the tokenizer's (where the
    pooled output is taken)."""
    vocab_size, hidden = state[name("embeddings.token_embedding.weight")].shape
    layers = 0
    while name(f"encoder.layers.{layers}.mlp.fc1.weight") in state:
        layers += 1
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=state[name("encoder.layers.0.mlp.fc1.weight")].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=state[name("embeddings.position_embedding.weight")].shape[0],
        layer_norm_eps=1e-5,
        hidden_act=tower.hidden_act,
        projection_dim=state[name("text_projection.weight")].shape[0] if tower.projection else None,
        **({} if eos_token_id is None else {"eos_token_id": eos_token_id}),
    )

# -----------------------------------------------------------------------------
# loading


# keys of an original checkpoint that are not weights of the networks: the training noise schedule (recomputed
# from scheduler_config), EMA copies of the UNet (model.diffusion_model.* is used, as in diffusers by default),
# CLIP's position_ids buffer, OpenCLIP's contrastive logit_scale and causal attn_mask.
_IGNORED_ORIGINAL_KEYS = re.compile(
    r"model_ema\..*|betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights"
    r"|(cond_stage_model\.transformer\.|conditioner\.embedders\.0\.transformer\.)(text_model\.)?embeddings\.position_ids"
    r"|(cond_stage_model\.model\.|conditioner\.embedders\.1\.model\.)(logit_scale|attn_mask)")


def _load_part(part, prefix, cls, config, to_original, file, device, dtype):
    """One network from its tensors in the file (below prefix, fused ones already split): renamed to native
    keys and loaded strictly, any key the file has but the model does not named in full."""
    to_native = {to_original(k, config): k for k in expected_state(cls, config)}
    unexpected = [prefix + k for k in part if k not in to_native]
    if unexpected:
        raise WeightsError(f"{file}: {cls.__name__} weights do not fit its config: unexpected keys: "
                           f"{some(unexpected)}")
    native = {}
    for k, v in part.items():
        if cls is AutoencoderKL and _is_vae_attention_weight(k) and v.ndim == 4:
            v = v[:, :, 0, 0]                                   # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        native[to_native[k]] = v
    names = {native_key: prefix + original for original, native_key in to_native.items()}
    return load_model(cls, config, native, file, device, dtype, names=names)


def _below(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _inferred(infer, part, prefix, what, file, family, *args):
    try:
        return infer(part, *args)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        reason = f"no key {prefix + e.args[0]}" if isinstance(e, KeyError) else str(e)
        raise WeightsError(f"{file}: not an {family.name} {what}: cannot infer its config ({reason})") from e


def _load_tower(state, tower, tokenizer, file, family, device, dtype):
    """One text encoder and its tokenizer (with the pad token the family's tower uses)."""
    prefix = tower.prefix
    if tower.style == "transformers":
        if any(k.startswith(prefix + "text_model.") for k in state):
            prefix += "text_model."                             # current transformers; old files have no level
        part, name = _below(state, prefix), lambda key: key
    else:
        part, name = split_fused(_below(state, prefix)), openclip_key_to_original
        if not tower.projection:
            part.pop("text_projection", None)                   # SD 2.x conditions on hidden states only
        stored = _count(part, "transformer.resblocks.")
        if tower.max_layers and stored == tower.max_layers + 1:  # SD 2.x: ViT-H's 24th layer, never run
            part = {k: v for k, v in part.items() if not k.startswith(f"transformer.resblocks.{stored - 1}.")}
    if tower.pad_token and tokenizer.pad_token != tower.pad_token:
        tokenizer = CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad_token=tower.pad_token,
                                  model_max_length=tokenizer.model_max_length)
    config = _inferred(infer_clip_config, part, prefix, "text encoder", file, family, tower, tokenizer.eos_id, name)
    encoder = _load_part(part, prefix, CLIPTextModel, config, lambda key, config: name(key), file, device, dtype)
    return encoder, tokenizer


def load_original(file, device, dtype, tokenizer):
    """Components from one original checkpoint file of any family (see the top of this file)."""
    return from_original_state(read_state_dict(file), file, device, dtype, tokenizer)


def from_original_state(state, file, device="cpu", dtype=torch.float32, tokenizer=None):
    """Components from the tensors of an original checkpoint (file: where they came from, for messages and the
    YAML config beside it). Meta tensors give meta networks: the key sets and configs without the weights."""
    file = Path(file)
    family = detect_family(state, file)
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE")):
        if not any(k.startswith(prefix) for k in state):
            raise WeightsError(f"{file}: not an {family.name} checkpoint: no {what} keys ({prefix}*); "
                               f"found {some(sorted(state))}")
    known = (UNET_PREFIX, VAE_PREFIX, *(t.prefix for t in family.towers))
    unknown = [k for k in state if not k.startswith(known) and not _IGNORED_ORIGINAL_KEYS.fullmatch(k)]
    if unknown:
        raise WeightsError(f"{file}: unexpected keys: {some(unknown)}")
    state = {k: v for k, v in state.items() if not _IGNORED_ORIGINAL_KEYS.fullmatch(k)}

    unet_part = _below(state, UNET_PREFIX)
    if family is SD2:
        family = _sd2_variant(file, unet_part.get("input_blocks.0.0.weight", torch.empty(0, 4)).shape[1])

    tokenizer = find_tokenizer(tokenizer, [file.parent, file.parent / "tokenizer"], file)
    encoders, tokenizers = [], []
    for i, tower in enumerate(family.towers):
        tok = tokenizer
        if i == 1 and (file.parent / "tokenizer_2").is_dir():   # SDXL's second, when one sits beside the file
            tok = find_tokenizer(None, [file.parent / "tokenizer_2"], file)
        encoder, tok = _load_tower(state, tower, tok, file, family, device, dtype)
        encoders.append(encoder)
        tokenizers.append(tok)

    vae_part = _below(state, VAE_PREFIX)
    vae_config = _inferred(infer_vae_config, vae_part, VAE_PREFIX, "VAE", file, family, family)
    vae = _load_part(vae_part, VAE_PREFIX, AutoencoderKL, vae_config, vae_key_to_original, file, device, dtype)
    pooled = encoders[-1].config.projection_dim if family.towers[-1].projection else None
    unet_config = _inferred(infer_unet_config, unet_part, UNET_PREFIX, "UNet", file, family, family, pooled,
                            vae_config.downsample_factor)
    unet = _load_part(unet_part, UNET_PREFIX, UNet, unet_config, unet_key_to_original, file, device, dtype)
    second = {"tokenizer_2": tokenizers[1], "text_encoder_2": encoders[1]} if len(encoders) == 2 else {}
    return Components(tokenizer=tokenizers[0], text_encoder=encoders[0], vae=vae, unet=unet,
                      scheduler_config=dict(family.scheduler_config),
                      force_zeros_for_empty_prompt=family.force_zeros_for_empty_prompt, **second)

# -----------------------------------------------------------------------------
# saving


def save_original(components, file):
    """
    Write the networks as one original checkpoint (.safetensors) of their family, the layout of
    v1-5-pruned-emaonly / v2-1_768-ema-pruned / sd_xl_base_1.0, readable by diffusers' from_single_file, the
    web UI and ComfyUI. The tokenizers and scheduler config are not stored (single files have none).
    """
    file = Path(file)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: save_original writes safetensors; name the file *.safetensors")
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_state(components), str(file), metadata={"format": "pt"})


def original_state(components):
    """
    {original key: tensor} of the networks, as save_original writes them (meta networks: meta tensors).
    An SD 2.x text encoder of ViT-H's 23 used layers gets the 24th that SD 2.x skips as an identity layer (zero
    weights), so that readers that count on 24 stored layers (and skip the last) read the 23 used ones.
    """
    c = components
    family = SDXL if c.text_encoder_2 is not None else \
        SD2 if c.text_encoder.config.hidden_act == "gelu" else SD1
    state = {}
    for k, v in tensors(c.unet).items():
        state[UNET_PREFIX + unet_key_to_original(k, c.unet.config)] = v
    for k, v in tensors(c.vae).items():
        original = vae_key_to_original(k, c.vae.config)
        state[VAE_PREFIX + original] = v[:, :, None, None].contiguous() if _is_vae_attention_weight(original) else v
    for tower, encoder in zip(family.towers, (c.text_encoder, c.text_encoder_2)):
        weights = tensors(encoder)
        if tower.style == "transformers":
            for k, v in weights.items():
                state[tower.prefix + clip_key_to_original(k)] = v
            # real SD 1.x / SDXL files carry CLIP's position_ids buffer; some readers look for it
            T = encoder.config.max_position_embeddings
            state[tower.prefix + "text_model.embeddings.position_ids"] = torch.arange(T)[None].to(
                encoder.final_layer_norm.weight.device)
            continue
        layers = encoder.config.num_hidden_layers
        if tower.max_layers and layers == tower.max_layers:     # SD 2.x: the 24th layer, an identity
            last = {k: v for k, v in weights.items() if k.startswith(f"encoder.layers.{layers - 1}.")}
            for k, v in last.items():   # zeros everywhere (so x + attn + mlp = x), LayerNorms at their identity
                norm_scale = re.search(r"layer_norm\d\.weight$", k) is not None
                weights[k.replace(f"layers.{layers - 1}.", f"layers.{layers}.")] = \
                    torch.ones_like(v) if norm_scale else torch.zeros_like(v)
        part = fuse_qkv({openclip_key_to_original(k): v for k, v in weights.items()})
        if not tower.projection:  # SD 2.x files carry ViT-H's (unused) projection; diffusers reads its width
            hidden = encoder.config.hidden_size
            part["text_projection"] = torch.zeros(hidden, hidden, device=encoder.final_layer_norm.weight.device)
        state.update({tower.prefix + k: v for k, v in part.items()})
    return state
