"""
Parity of model/vae.py with diffusers' AutoencoderKL: same state_dict keys and shapes, same
posterior (mean, logvar, std, seeded sample, kl) and decoded images for the same weights, and
SD 1.5's parameter count. diffusers is a test-only dependency; reference models are randomly initialised.
"""

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from model import sd15
from model.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TOL = 1e-4  # max abs difference, fp32

TINY = dict(  # SD 1.x-like, two levels (f = 2), both with channel changes somewhere
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8, sample_size=32,
)

THREE_LEVELS = dict(  # f = 4, two resnets per encoder level, first level widening from conv_in's width
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8, sample_size=32,
)

SD15 = sd15.VAE


def reference(cfg):
    torch.manual_seed(0)
    ref = RefAutoencoderKL(**cfg).eval()
    with torch.no_grad():  # default init leaves GroupNorms at identity; randomise them so they are tested too
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def ported(ref, cfg):
    """Our model with the reference's weights; asserts the key sets match and the load is strict."""
    model = AutoencoderKL(VAEConfig.from_diffusers(cfg)).eval()
    sd = ref.state_dict()
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)
    return model


def max_err(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [TINY, THREE_LEVELS], ids=["tiny", "three_levels"])
def test_matches_diffusers(cfg):
    ref = reference(cfg)
    model = ported(ref, cfg)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    assert model.config.downsample_factor == f
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 32 // f, 24 // f, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, model.encode(x)
        errs = {
            "mean": max_err(got.mean, want.mean),
            "logvar": max_err(got.logvar, want.logvar),
            "std": max_err(got.std, want.std),
            "sample": max_err(got.sample(torch.Generator().manual_seed(3)),
                              want.sample(torch.Generator().manual_seed(3))),
            "decode": max_err(model.decode(z), ref.decode(z).sample),
        }
        kl_want = want.kl()
        kl_err = max_err(got.kl(), kl_want) / kl_want.abs().max().item()  # a sum over the latent: relative
        # the reconstruction path used in training
        rec, posterior = model(x)
        errs["forward"] = max_err(rec, ref(x).sample)
    print(f"max abs errors {errs}, kl relative {kl_err:.1e}")
    assert got.mean.shape == (2, 4, 32 // f, 24 // f)
    assert max(errs.values()) < TOL
    assert kl_err < TOL


def test_diagonal_gaussian():
    moments = torch.randn(3, 8, 5, 5)
    moments[0, 4:] = 100.0   # logvar clamped to [-30, 20]
    moments[1, 4:] = -100.0
    d = DiagonalGaussian(moments)
    assert torch.equal(d.mean, moments[:, :4])
    assert d.logvar.max() == 20.0 and d.logvar.min() == -30.0
    assert torch.allclose(d.std, torch.exp(0.5 * d.logvar))
    assert torch.equal(d.mode(), d.mean)
    # seeded samples are reproducible; a list of generators draws each batch element with its own seed
    a = d.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, d.sample(torch.Generator().manual_seed(0)))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batched = d.sample(gens)
    single = DiagonalGaussian(moments[2:3]).sample(torch.Generator().manual_seed(7))
    assert torch.equal(batched[2:3], single)
    # KL of N(0, I) to N(0, I) is zero
    assert torch.allclose(DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl(), torch.zeros(2))


def test_config():
    cfg = VAEConfig.from_diffusers(SD15)
    assert cfg == VAEConfig.sd15() == VAEConfig()
    assert cfg.downsample_factor == 8 and cfg.scaling_factor == 0.18215
    assert VAEConfig(**cfg.to_dict()) == cfg
    for bad in (dict(act_fn="relu"), dict(use_quant_conv=False), dict(mid_block_add_attention=False),
                dict(shift_factor=0.1), dict(down_block_types=["DownEncoderBlock2D"] * 3),
                dict(up_block_types=["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VAEConfig.from_diffusers(dict(SD15, **bad))


@pytest.mark.slow
def test_sd15_shapes():
    """Full-size SD 1.5 VAE on the meta device: same keys, shapes and parameter count as diffusers."""
    with torch.device("meta"):
        ref = RefAutoencoderKL(**SD15)
        model = AutoencoderKL(VAEConfig.sd15())
    want = {k: v.shape for k, v in ref.state_dict().items()}
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert got == want
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    print(f"SD 1.5 VAE parameters: {n:,}")
