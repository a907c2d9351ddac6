"""
The Stable Diffusion 1.x variational autoencoder (AutoencoderKL, "KL-f8"): maps images
[B, 3, H, W] in [-1, 1] to a diagonal Gaussian over latents [B, 4, H/8, W/8] and latents back
to images.

    encoder: conv_in -> down levels (ResnetBlocks, then a stride-2 conv except at the last level)
             -> mid block (ResnetBlock, self-attention, ResnetBlock) -> GroupNorm, SiLU, conv_out
             -> quant_conv -> (mean, logvar)
    decoder: post_quant_conv -> conv_in -> mid block
             -> up levels (layers_per_block + 1 ResnetBlocks, then nearest 2x + conv except at the last)
             -> GroupNorm, SiLU, conv_out

No time embedding anywhere. encode/decode do not scale: the pipeline multiplies latents by
config.scaling_factor (0.18215 for SD 1.x) after encoding and divides before decoding.
Module names follow diffusers so that state_dict keys equal AutoencoderKL's exactly.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import norm_silu

# -----------------------------------------------------------------------------
# config

# diffusers AutoencoderKL options this VAE does not implement, with the one value it supports
# (the diffusers default, which SD 1.x uses). Any other value is refused by from_diffusers.
_FIXED_DIFFUSERS_OPTIONS = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,   # latent shift applied by SD3/Flux pipelines
    "latents_mean": None,
    "latents_std": None,
}


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # channels of each resolution level
    layers_per_block: int = 2           # ResnetBlocks per encoder level (decoder levels have one more)
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215     # latents * scaling_factor have roughly unit variance (SDXL: 0.13025)
    sample_size: int = 512              # image size the model was trained at
    force_upcast: bool = True           # diffusers' flag: run this VAE in fp32 when the model runs in fp16. Only
                                        # SDXL pipelines honour it (SDXL's VAE overflows in fp16: black images);
                                        # the fp16-fixed SDXL VAEs say False

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)  # lists from JSON compare equal

    @property
    def downsample_factor(self):
        """Image pixels per latent pixel along each side (8 for SD 1.x)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls):
        return cls(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                   layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215, sample_size=512)

    @classmethod
    def from_diffusers(cls, d):
        """From a diffusers AutoencoderKL config (vae/config.json as a dict); missing keys take diffusers' defaults."""
        for key, supported in _FIXED_DIFFUSERS_OPTIONS.items():
            value = d.get(key, supported)
            if value != supported:
                raise ValueError(f"unsupported VAE option {key}={value!r} (only {supported!r} is supported)")
        channels = tuple(d.get("block_out_channels", (64,)))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(d.get(key, [block]))
            if types != [block] * len(channels):
                raise ValueError(f"unsupported VAE option {key}={types!r} "
                                 f"(only {block!r} for each of the {len(channels)} levels is supported)")
        return cls(
            in_channels=d.get("in_channels", 3),
            out_channels=d.get("out_channels", 3),
            latent_channels=d.get("latent_channels", 4),
            block_out_channels=channels,
            layers_per_block=d.get("layers_per_block", 1),
            norm_num_groups=d.get("norm_num_groups", 32),
            scaling_factor=d.get("scaling_factor", 0.18215),
            sample_size=d.get("sample_size", 32),
            force_upcast=bool(d.get("force_upcast", True)),
        )

    def to_dict(self):
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

# -----------------------------------------------------------------------------
# the latent distribution


class DiagonalGaussian:
    """
    N(mean, exp(logvar)) per latent element, from the encoder's moments [B, 2C, h, w]
    (first C channels the mean, last C the log-variance, clamped to [-30, 20] as the original).
    """

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)       # [B, C, h, w] each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """
        mean + std * eps. eps is drawn on the generator's device (CPU noise for a CPU generator,
        whatever device the latents live on), like diffusers, so the same seed gives the same
        sample; a list of generators draws one batch element each.
        """
        shape, device, dtype = self.mean.shape, self.mean.device, self.mean.dtype
        if isinstance(generator, (list, tuple)):
            eps = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
                             for g in generator])
        else:
            rand_device = generator.device if generator is not None else device
            eps = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype)
        return self.mean + self.std * eps.to(device)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(self || N(0, I)) summed over each sample's latent: [B]."""
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

# -----------------------------------------------------------------------------
# building blocks


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, dropout, conv; + (1x1 conv if channels change) shortcut."""

    def __init__(self, in_ch, out_ch, num_groups=32, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None

    def forward(self, x):
        # x: [B, in_ch, H, W] -> [B, out_ch, H, W]
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x)      # in place: the conv's output is ours, and its backward does not need it


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch, num_groups=32):
        super().__init__()
        self.group_norm = nn.GroupNorm(num_groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # a list only so that the key reads to_out.0

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)   # [B, HW, C]
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]         # [B, HW, C], scale 1/sqrt(C)
        h = self.to_out[0](h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv (as the original)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, ch, num_groups):
        super().__init__()
        self.attentions = nn.ModuleList([AttnBlock(ch, num_groups)])
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, num_groups), ResnetBlock(ch, ch, num_groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """One encoder level: ResnetBlocks, then optionally a Downsample."""

    def __init__(self, in_ch, out_ch, num_layers, num_groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, num_groups)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResnetBlocks, then optionally an Upsample."""

    def __init__(self, in_ch, out_ch, num_layers, num_groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, num_groups)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x

# -----------------------------------------------------------------------------
# encoder, decoder, autoencoder


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> moments [B, 2 * latent_channels, H/f, W/f] (before quant_conv)."""

    def __init__(self, cfg):
        super().__init__()
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block, g, downsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class Decoder(nn.Module):
    """[B, latent_channels, h, w] (after post_quant_conv) -> [B, out_channels, h*f, w*f]."""

    def __init__(self, cfg):
        super().__init__()
        chs, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList([
            UpBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, g, upsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)])
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class AutoencoderKL(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1)

    def encode(self, x):
        """x: images [B, in_channels, H, W] in [-1, 1], H and W multiples of f -> DiagonalGaussian over [B, C, H/f, W/f]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: unscaled latents [B, C, h, w] -> images [B, out_channels, h*f, w*f], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=False, generator=None):
        """Reconstruction, for training: (decode(sample or mode of encode(x)), the posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
