"""
Parity of model/unet.py (+ model/attention.py) with diffusers' UNet2DConditionModel:
same state_dict keys and shapes, same outputs for the same weights, and SD 1.5's parameter count.
diffusers is a test-only dependency; reference models are randomly initialised from config dicts.
"""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from model import sd15
from model.unet import UNet, UNetConfig, timestep_embedding

TOL = 1e-4  # max abs difference, fp32

TINY = dict(  # SD 1.x-like, two levels
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)

THREE_LEVELS = dict(  # attention on two of three levels, per-level head counts, two layers per block
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 48), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4, 8), norm_num_groups=8,
)

SD15 = sd15.UNET


def randomize_(model, seed=0):
    """Perturb every parameter (GroupNorm/LayerNorm scales and zero biases included) so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 * p.std().item() if p.numel() > 1 and p.std() > 0 else 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def reference_and_ours(diffusers_config, seed=0):
    torch.manual_seed(seed)
    ref = randomize_(UNet2DConditionModel(**diffusers_config), seed).eval()
    ours = UNet(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(our_sd) == set(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    return ref, ours


def max_err(ref, ours, x, t, ctx):
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == want.shape == (x.shape[0], ref.config.out_channels, *x.shape[2:])
    return (got - want).abs().max().item()


@pytest.mark.parametrize("in_channels", [4, 9])
def test_tiny_unet_matches_diffusers(in_channels):
    ref, ours = reference_and_ours({**TINY, "in_channels": in_channels})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, 32, generator=g)
    errors = {
        "per-sample int t": max_err(ref, ours, x, torch.tensor([10, 900]), ctx),
        "per-sample float t": max_err(ref, ours, x, torch.tensor([3.5, 517.25]), ctx),
        "python int t": max_err(ref, ours, x, 999, ctx),
        "0-d float tensor t": max_err(ref, ours, x, torch.tensor(250.0), ctx),
    }
    print(f"in_channels={in_channels} max abs errors: {errors}")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("linear_projection", [False, True])
def test_three_level_unet_matches_diffusers(linear_projection):
    ref, ours = reference_and_ours({**THREE_LEVELS, "use_linear_projection": linear_projection}, seed=2)
    assert ours.config.heads() == (2, 4, 8)
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(2, 5, 24, generator=g)
    errors = {
        "16x16": max_err(ref, ours, torch.randn(2, 4, 16, 16, generator=g), torch.tensor([1, 500]), ctx),
        # odd sizes on the way down (10x12 -> 5x6 -> 3x3): upsampling must return to the skips' sizes
        "10x12": max_err(ref, ours, torch.randn(2, 4, 10, 12, generator=g), 42, ctx),
    }
    print(f"three levels, linear_projection={linear_projection} max abs errors: {errors}")
    assert max(errors.values()) < TOL, errors


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0, 1, 17.5, 999])
    want = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert (timestep_embedding(t, 320) - want).abs().max().item() < 1e-6


def test_config_from_diffusers_and_round_trip():
    cfg = UNetConfig.from_diffusers(SD15)
    assert cfg == UNetConfig.sd15() == UNetConfig()
    assert cfg.heads() == (8, 8, 8, 8)
    assert cfg.attention_levels == (True, True, True, False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert UNetConfig(**d) == cfg
    three = UNetConfig.from_diffusers(THREE_LEVELS)
    assert UNetConfig(**json.loads(json.dumps(three.to_dict()))) == three
    assert UNetConfig.from_diffusers({**SD15, "in_channels": 9}).in_channels == 9


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_image"),
    ("class_embed_type", "timestep"),
    ("reverse_transformer_layers_per_block", [[1], [1], [1], [1]]),
    ("resnet_time_scale_shift", "scale_shift"),
    ("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["SimpleCrossAttnDownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D"] * 4),
])
def test_config_refuses_unsupported_options(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers({**SD15, key: value})


@pytest.mark.slow
def test_sd15_full_size_keys_shapes_and_parameter_count():
    counts = {}
    for in_channels in (4, 9):
        d = {**SD15, "in_channels": in_channels}
        with torch.device("meta"):
            ref = UNet2DConditionModel(**d)
            ours = UNet(UNetConfig.from_diffusers(d))
        ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
        our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert our_shapes == ref_shapes
        n = sum(p.numel() for p in ours.parameters())
        assert n == sum(p.numel() for p in ref.parameters())
        counts[in_channels] = n
    assert counts[4] == 859_520_964
    assert counts[9] == 859_520_964 + 5 * 320 * 3 * 3  # 5 more input channels in conv_in
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet(UNetConfig.sd15()).parameters()) == 859_520_964
