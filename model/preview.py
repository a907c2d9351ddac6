"""
Cheap live previews of latents: a linear latent -> RGB map, fitted to each model's own VAE.

A full VAE decode per step costs about as much as a UNet step; a preview must cost next to nothing. A
Stable Diffusion latent cell is close to a linear function of the average colour of the f x f pixels it
covers (that is how the well-known hand-written "latent RGB factors" of SD 1.5 and SDXL previews work).
Rather than hard-code those numbers for one family, `LatentPreview.fit(vae)` finds them for whatever VAE
is loaded, by least squares on a handful of synthetic images:

    images  [N, 3, S, S]  smooth colour fields, two-colour gradients, flat blocks (a fixed seed)
      --VAE enc, posterior mean, * scaling_factor-->  z    [N, C, S/f, S/f]  (the sampler's latent space)
      --avg pool f x f------------------------------>  rgb  [N, 3, S/f, S/f]
    solve  rgb ~= W z + b  over all N (S/f)^2 cells  (torch.linalg.lstsq; W [3, C], b [3])

A preview is then one 1x1 "convolution" of the latents (einsum over channels), a clamp and a PNG of
latent resolution (S/f: 64 x 64 for a 512 x 512 SD 1.5 image), optionally resized to the job's size.

    preview = LatentPreview.fit(pipe.vae)          # at load: 8 images of 64 x 64 through the encoder
    preview.to_images(latents)                     # [B, C, h, w] -> B PIL images of w x h
    preview.to_images(latents, size=(768, 512))    # ... resized to 768 x 512 (width, height)

Cost of fit (CPU fp32, 2 threads of an AMD EPYC, bench/preview.py): ~50 ms for the default model in weights/
(~0.45 s on the very first call, which pays oneDNN's and optimize()'s tuner's first-call costs), ~1.2 s for an
SD 1.5 VAE (its 34M-parameter encoder on 8 images of 64 x 64; a GPU does it in milliseconds); the least-squares
solve itself is well under a millisecond. A preview then costs ~1 ms (default model, 16 x 16 latents, map + PNG)
or ~3 ms (SD 1.5, 64 x 64 latents; ~80 ms resized to 512 x 512 first), against UNet steps of ~25 ms and ~18 s.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image


# -----------------------------------------------------------------------------
# synthetic training images


def fit_images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n images [n, 3, size, size] in [-1, 1], deterministic: in turn a smooth random colour field (4 x 4
    random colours, bilinear), a gradient between two random colours at a random angle, and flat blocks
    (4 x 4 random colours, nearest). The random colours are corners of the colour cube (each channel 0 or 1:
    black, white, primaries, secondaries), which the fields and gradients blend into mid-tones: saturated
    colours are what previews most need right, and uniform random colours (mostly muddy mid-tones) fit the
    default model's VAE worse (mean abs error on its palette 54/255 against 46/255 with these)."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size                  # [S] in (0, 1)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")                            # [S, S] each
    def colours(*shape):
        return (torch.rand(*shape, generator=g) < 0.5).float()

    images = []
    for i in range(n):
        kind = i % 3
        if kind == 0:    # smooth field
            img = F.interpolate(colours(1, 3, 4, 4), size=(size, size), mode="bilinear",
                                align_corners=False)[0]
        elif kind == 1:  # gradient from colour a to colour b along a random direction
            a, b = colours(3, 1, 1), colours(3, 1, 1)
            angle = torch.rand(1, generator=g).item() * 2 * math.pi
            t = math.cos(angle) * xx + math.sin(angle) * yy
            t = (t - t.min()) / (t.max() - t.min())                                   # [S, S] in [0, 1]
            img = a + (b - a) * t
        else:            # flat blocks
            img = F.interpolate(colours(1, 3, 4, 4), size=(size, size), mode="nearest")[0]
        images.append(img)
    return torch.stack(images) * 2 - 1                                                 # [n, 3, S, S]


# -----------------------------------------------------------------------------
# the map


class LatentPreview:
    """rgb = W z + b per latent cell: latents [B, C, h, w] (scaled, as the sampler holds them) -> [B, 3, h, w]
    in [-1, 1]. weight [3, C], bias [3], float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight.float()   # [3, C]
        self.bias = bias.float()       # [3]

    @classmethod
    @torch.no_grad()
    def fit(cls, vae, n: int = 8, size: Optional[int] = None, seed: int = 0) -> "LatentPreview":
        """Least squares from `vae` (model/vae.py's AutoencoderKL, on any device and dtype): n synthetic images
        of size x size (default max(64, 8 f): at least 8 x 8 latent cells an image) encoded to their posterior
        mean times the VAE's scaling_factor, the space StableDiffusion.encode_images and the sampler use."""
        f = vae.config.downsample_factor
        size = max(64, 8 * f) if size is None else size
        p = next(vae.parameters())
        images = fit_images(n, size, seed)                                             # [N, 3, S, S]
        z = vae.encode(images.to(p.device, p.dtype)).mean.float().cpu()               # [N, C, S/f, S/f]
        z = z * vae.config.scaling_factor
        rgb = F.avg_pool2d(images, f)                                                  # [N, 3, S/f, S/f]
        C = z.shape[1]
        A = z.permute(0, 2, 3, 1).reshape(-1, C).double()                              # [M, C], M cells
        A = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype)], dim=1)                # [M, C + 1]
        Y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()                            # [M, 3]
        sol = torch.linalg.lstsq(A, Y).solution                                        # [C + 1, 3]
        return cls(sol[:C].T, sol[C]).to(p.device)

    def to(self, device) -> "LatentPreview":
        return LatentPreview(self.weight.to(device), self.bias.to(device))

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] -> rgb [B, 3, h, w], roughly in [-1, 1] (not clamped)."""
        w, b = self.weight.to(latents.device), self.bias.to(latents.device)
        return torch.einsum("bchw,oc->bohw", latents.float(), w) + b[:, None, None]

    def to_images(self, latents: torch.Tensor, size: Optional[tuple[int, int]] = None,
                  resample: int = Image.BILINEAR) -> list[Image.Image]:
        """latents [B, C, h, w] -> B PIL RGB images of w x h, or resized to size = (width, height) (give the
        job's width and height for a preview of its aspect ratio; resample: a PIL filter, e.g. Image.NEAREST)."""
        with torch.no_grad():
            rgb = ((self(latents).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, 3, h, w]
            pixels = rgb.permute(0, 2, 3, 1).cpu().numpy()                             # [B, h, w, 3]
        images = [Image.fromarray(p) for p in pixels]
        if size is not None and tuple(size) != images[0].size:
            images = [im.resize(tuple(size), resample) for im in images]
        return images
