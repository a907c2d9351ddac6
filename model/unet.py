"""
The Stable Diffusion conditional UNet (SD 1.x, SD 2.x, SDXL): predicts the noise in a latent x_t given
the timestep t and the text encoder's hidden states (context); SDXL also takes the pooled text embedding
and six "micro-conditioning" numbers (time_ids), embedded and added to the timestep embedding.

    conv_in -> down levels (ResnetBlocks [+ SpatialTransformers], stride-2 conv) -> mid block
    -> up levels (ResnetBlocks on [x, skip] [+ SpatialTransformers], nearest 2x + conv)
    -> GroupNorm, SiLU, conv_out

Every ResnetBlock also gets the timestep embedding. Module names follow diffusers so that
state_dict keys equal UNet2DConditionModel's exactly.

The families differ only in config: SD 2.x has per-level head counts, Linear proj_in/proj_out, 1024-wide
context and fp32 attention scores (upcast_attention); SDXL has three levels, the first without attention,
deeper spatial transformers (transformer_layers_per_block (1, 2, 10)), 2048-wide context and the added
text_time embedding.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import SpatialTransformer
from model.layers import norm_silu

# -----------------------------------------------------------------------------
# config

# diffusers UNet2DConditionModel options this UNet does not implement, with the one value it supports
# (mostly the diffusers default, which SD 1.x uses). Any other value is refused by from_diffusers.
_FIXED_DIFFUSERS_OPTIONS = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
}


def _one_value(name, value):
    """diffusers allows some options per level; this UNet needs them equal across levels."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"unsupported UNet option {name}={value!r}: must be the same for every level")
        return value[0]
    return value


@dataclass
class UNetConfig:
    in_channels: int = 4                # 4 latent channels; 9 for the inpainting UNet (latent + mask + masked latent)
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)   # channels of each resolution level
    layers_per_block: int = 2           # ResnetBlocks per down level (up levels have one more)
    attention_levels: tuple = (True, True, True, False)  # down levels with SpatialTransformers; up levels mirror it
    cross_attention_dim: int = 768      # width of the text encoder's hidden states
    # NUMBER OF HEADS per SpatialTransformer (int, or one per level). diffusers calls it attention_head_dim
    # for historical reasons; SD 1.x uses 8 heads everywhere (head size = channels // 8).
    attention_head_dim: object = 8
    # transformer blocks per SpatialTransformer (int, or one per level; the mid block uses the last level's).
    # 1 in SD 1.x/2.x; SDXL base: (1, 2, 10).
    transformer_layers_per_block: object = 1
    norm_num_groups: int = 32
    sample_size: int = 64               # latent size the model was trained at (512 px / 8)
    use_linear_projection: bool = False  # SpatialTransformer proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv
    upcast_attention: bool = False      # attention scores and softmax in fp32 under fp16/bf16 (SD 2.1 needs it)
    # SDXL's added conditioning: addition_embed_type "text_time" (or None). Each of the time_ids (SDXL base: 6)
    # gets a sinusoidal embedding of addition_time_embed_dim (256) channels; they and the pooled text embedding
    # (1280) make projection_class_embeddings_input_dim (2816) inputs of an MLP into the timestep embedding.
    addition_embed_type: object = None
    addition_time_embed_dim: object = None
    projection_class_embeddings_input_dim: object = None
    dropout: float = 0.0                # in the ResnetBlocks (training only)

    def __post_init__(self):
        # lists (from JSON) become tuples so that configs compare equal however they were made
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if isinstance(self.attention_head_dim, (list, tuple)):
            self.attention_head_dim = tuple(self.attention_head_dim)
        if isinstance(self.transformer_layers_per_block, (list, tuple)):
            self.transformer_layers_per_block = tuple(self.transformer_layers_per_block)
        n = len(self.block_out_channels)
        if len(self.attention_levels) != n:
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries, expected {n}")
        if len(self.heads()) != n:
            raise ValueError(f"attention_head_dim has {len(self.heads())} entries, expected {n}")
        if len(self.depths()) != n or not all(isinstance(d, int) and d >= 1 for d in self.depths()):
            raise ValueError(f"transformer_layers_per_block={self.transformer_layers_per_block!r}: "
                             f"expected an int >= 1 or {n} of them, one per level")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unsupported UNet option addition_embed_type={self.addition_embed_type!r} "
                             f"(only None and 'text_time' are supported)")
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(getattr(self, name), int):
                    raise ValueError(f"addition_embed_type='text_time' needs an int {name}, "
                                     f"got {getattr(self, name)!r}")
            if self.addition_time_embed_dim % 2:
                raise ValueError(f"unsupported UNet option addition_time_embed_dim={self.addition_time_embed_dim}: "
                                 f"must be even (cos, sin halves)")

    def heads(self):
        """Number of attention heads of each level, a tuple with one entry per level."""
        h = self.attention_head_dim
        return tuple(h) if isinstance(h, tuple) else (h,) * len(self.block_out_channels)

    def depths(self):
        """Transformer blocks per SpatialTransformer of each level, a tuple with one entry per level."""
        d = self.transformer_layers_per_block
        return tuple(d) if isinstance(d, tuple) else (d,) * len(self.block_out_channels)

    @classmethod
    def sd15(cls):
        return cls(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                   attention_levels=(True, True, True, False), cross_attention_dim=768, attention_head_dim=8,
                   norm_num_groups=32, sample_size=64)

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers UNet2DConditionModel config (its config.json as a dict): SD 1.x, SD 2.x or SDXL."""
        for key, supported in _FIXED_DIFFUSERS_OPTIONS.items():
            value = d.get(key, supported)
            if isinstance(value, (list, tuple)) and key == "only_cross_attention":
                value = _one_value(key, value)
            if key == "mid_block_only_cross_attention" and value is False:
                value = None  # False and None mean the same here
            if value != supported:
                raise ValueError(f"unsupported UNet option {key}={value!r} (only {supported!r} is supported)")
        down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        for name in down:
            if name not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"unsupported UNet option down_block_types: {name!r}")
        attention_levels = tuple(name == "CrossAttnDownBlock2D" for name in down)
        mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
        if up != mirrored:
            raise ValueError(f"unsupported UNet option up_block_types={up!r}: must mirror down_block_types ({mirrored!r})")
        # diffusers' naming mess: attention_head_dim is the NUMBER of heads (head size = channels // it), unless
        # num_attention_heads is set, which then wins (diffusers: num_attention_heads or attention_head_dim).
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        depth = d.get("transformer_layers_per_block", 1)
        if isinstance(depth, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in depth):
            raise ValueError(f"unsupported UNet option transformer_layers_per_block={depth!r}: "
                             f"one depth per level, not per layer")
        text_time = d.get("addition_embed_type") == "text_time"
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d.get("block_out_channels", (320, 640, 1280, 1280))),
            layers_per_block=_one_value("layers_per_block", d.get("layers_per_block", 2)),
            attention_levels=attention_levels,
            cross_attention_dim=_one_value("cross_attention_dim", d.get("cross_attention_dim", 1280)),
            attention_head_dim=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
            transformer_layers_per_block=tuple(depth) if isinstance(depth, (list, tuple)) else depth,
            norm_num_groups=d.get("norm_num_groups", 32),
            sample_size=_one_value("sample_size", d.get("sample_size", 64)),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=bool(d.get("upcast_attention")),   # SDXL's config.json says null
            dropout=d.get("dropout", 0.0),
            addition_embed_type=d.get("addition_embed_type"),   # anything but None / text_time: refused above
            addition_time_embed_dim=d.get("addition_time_embed_dim") if text_time else None,
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim") if text_time else None,
        )

    def to_dict(self):
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

# -----------------------------------------------------------------------------
# timestep embedding


def timestep_embedding(t, dim, max_period=10000):
    """
    Sinusoidal embedding of (possibly fractional) timesteps t: [B] -> [B, dim], cos half first
    (diffusers' flip_sin_to_cos=True, freq_shift=0). Frequencies go from 1 down to 1/max_period.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]                    # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear, SiLU, linear."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))

# -----------------------------------------------------------------------------
# building blocks


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, + projected time embedding, GroupNorm, SiLU, dropout, conv; + (1x1 conv) shortcut."""

    def __init__(self, in_ch, out_ch, temb_dim, num_groups=32, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None

    def forward(self, x, temb):
        # x: [B, in_ch, H, W], temb: [B, temb_dim] -> [B, out_ch, H, W]
        h = self.conv1(norm_silu(self.norm1, x))
        h += self.time_emb_proj(F.silu(temb))[:, :, None, None]     # in place: h is the conv's fresh output
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (2x, or the skip's size when H, W were odd), then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One down level: `layers` ResnetBlocks (each followed by a SpatialTransformer if attention), then Downsample."""

    def __init__(self, in_ch, out_ch, temb_dim, layers, attention, heads, depth, context_dim, num_groups,
                 linear_projection, upcast, dropout, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim, num_groups, dropout) for i in range(layers)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, heads, context_dim, num_groups, depth, linear_projection=linear_projection,
                                upcast=upcast)
             for _ in range(layers)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x, temb, context):
        # returns the output and the skip connections it produced (one per layer, one after downsampling)
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """At the lowest resolution: ResnetBlock, SpatialTransformer, ResnetBlock."""

    def __init__(self, ch, temb_dim, heads, depth, context_dim, num_groups, linear_projection, upcast, dropout):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_dim, num_groups, dropout) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(ch, heads, context_dim, num_groups, depth, linear_projection=linear_projection,
                                upcast=upcast)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """
    One up level: layers+1 ResnetBlocks, each on [x, skip] concatenated along channels (skips taken
    last-in first-out), each followed by a SpatialTransformer if attention; then Upsample.
    prev_ch: channels coming from below; skip_ch: channels of this level's last (outermost) skip.
    """

    def __init__(self, prev_ch, out_ch, skip_ch, temb_dim, layers, attention, heads, depth, context_dim, num_groups,
                 linear_projection, upcast, dropout, upsample):
        super().__init__()
        resnets = []
        for i in range(layers):
            x_ch = prev_ch if i == 0 else out_ch
            s_ch = skip_ch if i == layers - 1 else out_ch
            resnets.append(ResnetBlock(x_ch + s_ch, out_ch, temb_dim, num_groups, dropout))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, heads, context_dim, num_groups, depth, linear_projection=linear_projection,
                                upcast=upcast)
             for _ in range(layers)]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, skips, temb, context, size=None):
        # skips: this level's skip connections in the order the down path made them; size: upsampled H, W
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips[-1 - i]], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x

# -----------------------------------------------------------------------------
# the UNet


class UNet(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        ch = config.block_out_channels
        n = len(ch)
        heads, depths = config.heads(), config.depths()
        temb_dim = 4 * ch[0]
        common = dict(context_dim=config.cross_attention_dim, num_groups=config.norm_num_groups,
                      linear_projection=config.use_linear_projection, upcast=config.upcast_attention,
                      dropout=config.dropout)

        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        if config.addition_embed_type == "text_time":
            # SDXL: MLP on [pooled text, sinusoids of the time_ids], added to the timestep embedding
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)

        # down: level i goes from ch[i-1] to ch[i] channels, then halves the resolution (all but the last)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], temb_dim, config.layers_per_block, config.attention_levels[i],
                      heads[i], depths[i], downsample=i < n - 1, **common)
            for i in range(n)])

        self.mid_block = MidBlock(ch[-1], temb_dim, heads[-1], depths[-1], **common)

        # up: the levels in reverse; level i takes ch[i+1] channels from below and the skips of down level i
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[min(i + 1, n - 1)], ch[i], ch[max(i - 1, 0)], temb_dim, config.layers_per_block + 1,
                    config.attention_levels[i], heads[i], depths[i], upsample=i > 0, **common)
            for i in reversed(range(n))])

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        """
        x: [B, in_channels, H, W] noisy latents; t: timesteps, a number, a 0-d tensor or [B] tensor (int or float);
        context: [B, L, cross_attention_dim] text hidden states, or a RaggedContext (model/attention.py: rows
        of different lengths) that the cross-attentions take as it is. Returns [B, out_channels, H, W].
        SDXL (addition_embed_type "text_time") also needs, and other UNets refuse:
        text_embeds: [B, P] pooled text embeddings (SDXL base: P = 1280, the second text encoder's projection);
        time_ids: [B, K] micro-conditioning (SDXL base: K = 6, original H, W, crop top, left, target H, W),
        with P + K * addition_time_embed_dim = projection_class_embeddings_input_dim.
        """
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)   # [B]
        temb = timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype)
        temb = self.time_embedding(temb)                                # [B, 4*ch0]
        temb = self.add_text_time(temb, text_embeds, time_ids)

        x = self.conv_in(x)                                             # [B, ch0, H, W]
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)

        x = self.mid_block(x, temb, context)                            # [B, ch[-1], H/2^(n-1), W/2^(n-1)]

        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[-2:] if skips else None             # resolution of the next level up
            x = block(x, block_skips, temb, context, size)

        x = self.conv_out(norm_silu(self.conv_norm_out, x))             # [B, out_channels, H, W]
        return x

    def add_text_time(self, temb, text_embeds, time_ids):
        """SDXL: temb + MLP([text_embeds, sinusoid(time_ids) flattened]); other UNets: temb, and no extras allowed."""
        if self.config.addition_embed_type != "text_time":
            if text_embeds is not None or time_ids is not None:
                raise ValueError("text_embeds/time_ids given to a UNet without addition_embed_type='text_time'")
            return temb
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds and time_ids")
        B = temb.shape[0]
        time_ids = torch.as_tensor(time_ids, device=temb.device).reshape(B, -1)          # [B, K]
        K = time_ids.shape[1]
        emb = timestep_embedding(time_ids.reshape(-1), self.config.addition_time_embed_dim)  # [B*K, D]
        emb = emb.reshape(B, K * self.config.addition_time_embed_dim)                    # [B, K*D]
        emb = torch.cat([text_embeds.to(temb.dtype), emb.to(temb.dtype)], dim=-1)       # [B, P + K*D]
        return temb + self.add_embedding(emb)                                           # [B, 4*ch0]
