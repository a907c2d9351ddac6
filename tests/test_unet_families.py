"""
The UNet options of the SD 2.x and SDXL families (model/unet.py, model/attention.py) against diffusers'
UNet2DConditionModel: per-level heads with Linear projections and upcast_attention (SD 2.x), a first level
without attention, per-level transformer depth and the text_time added embedding (SDXL), 9-channel inpainting
variants. Tiny random references saved with save_pretrained and loaded here as a user's folder would be;
full-size configs compared on the meta device (no weights).
"""

import json
import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from model import attention
from model.unet import UNet, UNetConfig
from test_unet import randomize_

TOL = 1e-4          # max abs difference, fp32
BF16_TOL = 0.1      # bf16: both sides round every layer to 8 bits of mantissa

SD2_TINY = dict(  # SD 2.x-like: per-level head counts, Linear proj_in/proj_out, fp32 attention scores
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True,
)

POOLED, TIME_DIM, N_TIME_IDS = 12, 8, 6
SDXL_TINY = dict(  # SDXL-like: no attention on the first level, deeper transformers below, text_time embedding
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 48), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=40, attention_head_dim=(2, 4, 6), transformer_layers_per_block=(1, 2, 3),
    norm_num_groups=8, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + N_TIME_IDS * TIME_DIM,
)

# the published unet/config.json files, as diffusers saved them (nulls included)
SD21 = dict(  # stabilityai/stable-diffusion-2-1
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, num_class_embeds=None,
    only_cross_attention=False, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True, upcast_attention=True,
)
SDXL = dict(  # stabilityai/stable-diffusion-xl-base-1.0
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True,
)

SDXL_REFINER = {  # stabilityai/stable-diffusion-xl-refiner-1.0: 4 levels, attention on the middle two, 5 time_ids
    **SDXL, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                      "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def saved_reference_and_ours(diffusers_config, folder, seed=0):
    """A random diffusers UNet saved with save_pretrained, and ours built from its config.json + safetensors."""
    torch.manual_seed(seed)
    ref = randomize_(UNet2DConditionModel(**diffusers_config), seed).eval()
    ref.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    ours = UNet(UNetConfig.from_diffusers(config)).eval()
    ours.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours


def sdxl_extras(batch, g):
    """Pooled text embeddings [B, POOLED] and time_ids [B, 6] (original H, W, crop top, left, target H, W)."""
    text_embeds = torch.randn(batch, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1360.0, 32.0, 64.0, 896.0, 1152.0]])
    return text_embeds, time_ids[:batch]


def outputs(ref, ours, x, t, ctx, text_embeds=None, time_ids=None):
    added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        got = ours(x, t, ctx, text_embeds=text_embeds, time_ids=time_ids)
    assert got.shape == want.shape == (x.shape[0], ref.config.out_channels, *x.shape[2:])
    assert got.dtype == want.dtype == x.dtype
    return got, want


def max_err(ref, ours, *args, **kwargs):
    got, want = outputs(ref, ours, *args, **kwargs)
    return (got.float() - want.float()).abs().max().item()


@pytest.mark.parametrize("in_channels", [4, 9])
def test_sd2_style_unet_matches_diffusers(tmp_path, in_channels):
    start = time.perf_counter()
    ref, ours = saved_reference_and_ours({**SD2_TINY, "in_channels": in_channels}, tmp_path)
    cfg = ours.config
    assert (cfg.heads(), cfg.use_linear_projection, cfg.upcast_attention) == ((2, 4), True, True)
    assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.upcast
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 7, 32, generator=g)
    errors = {
        "16x16": max_err(ref, ours, torch.randn(2, in_channels, 16, 16, generator=g), torch.tensor([10, 900]), ctx),
        "10x12, float t": max_err(ref, ours, torch.randn(2, in_channels, 10, 12, generator=g), 517.25, ctx),
    }
    print(f"SD 2.x style, in_channels={in_channels}: max abs errors {errors}, "
          f"{time.perf_counter() - start:.2f} s")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("in_channels", [4, 9])
def test_sdxl_style_unet_matches_diffusers(tmp_path, in_channels):
    start = time.perf_counter()
    ref, ours = saved_reference_and_ours({**SDXL_TINY, "in_channels": in_channels}, tmp_path, seed=2)
    cfg = ours.config
    assert cfg.attention_levels == (False, True, True) and cfg.depths() == (1, 2, 3)
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 3          # the last level's depth
    assert [len(a.transformer_blocks) for a in ours.up_blocks[1].attentions] == [2, 2]   # up mirrors down
    assert ours.down_blocks[0].attentions is None and ours.up_blocks[-1].attentions is None
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(2, 5, 40, generator=g)
    text_embeds, time_ids = sdxl_extras(2, g)
    errors = {
        "16x16": max_err(ref, ours, torch.randn(2, in_channels, 16, 16, generator=g), torch.tensor([1, 500]), ctx,
                         text_embeds, time_ids),
        "12x20, int t": max_err(ref, ours, torch.randn(2, in_channels, 12, 20, generator=g), 999, ctx,
                                text_embeds, time_ids),
    }
    # the added embedding matters: other time_ids give another output
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    with torch.no_grad():
        a = ours(x, 10, ctx, text_embeds=text_embeds, time_ids=time_ids)
        b = ours(x, 10, ctx, text_embeds=text_embeds, time_ids=time_ids.flip(0))
    assert (a - b).abs().max().item() > 1e-3
    print(f"SDXL style, in_channels={in_channels}: max abs errors {errors}, {time.perf_counter() - start:.2f} s")
    assert max(errors.values()) < TOL, errors


def test_sdxl_style_unet_needs_and_sd_unets_refuse_the_added_conditioning(tmp_path):
    ours = UNet(UNetConfig.from_diffusers(SDXL_TINY)).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 40)
    with torch.no_grad(), pytest.raises(ValueError, match="text_embeds and time_ids"):
        ours(x, 1, ctx)
    sd2 = UNet(UNetConfig.from_diffusers(SD2_TINY)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="text_time"):
        sd2(x, 1, torch.randn(1, 3, 32), text_embeds=torch.randn(1, POOLED), time_ids=torch.zeros(1, 6))


@pytest.mark.parametrize("family, explicit", [("sd2", False), ("sdxl", False), ("sd2", True)])
def test_bf16_with_upcast_attention_close_to_diffusers(tmp_path, monkeypatch, family, explicit):
    if explicit:  # the path of devices whose SDPA may reduce in bf16: attention on fp32 q, k, v, cast back
        monkeypatch.setattr(attention, "_SDPA_FP32_DEVICES", ())
    start = time.perf_counter()
    config = SD2_TINY if family == "sd2" else {**SDXL_TINY, "upcast_attention": True}
    ref, ours = saved_reference_and_ours(config, tmp_path, seed=4)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g).to(torch.bfloat16)
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g).to(torch.bfloat16)
    extras = sdxl_extras(2, g) if family == "sdxl" else (None, None)
    extras = tuple(e if e is None else e.to(torch.bfloat16) for e in extras)
    got, want = outputs(ref, ours, x, torch.tensor([10, 900]), ctx, *extras)
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    path = " (explicit fp32)" if explicit else ""
    print(f"{family} bf16, upcast_attention{path}: max abs error {err:.4f} (outputs up to {scale:.2f}), "
          f"{time.perf_counter() - start:.2f} s")
    assert err < BF16_TOL * max(scale, 1.0), (err, scale)


def test_num_attention_heads_wins_over_attention_head_dim():
    # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (attention_head_dim being, for
    # historical reasons, the number of heads); its UNet2DConditionModel itself still refuses a non-null value
    cfg = UNetConfig.from_diffusers({**SD2_TINY, "num_attention_heads": (4, 8), "attention_head_dim": 64})
    assert cfg.heads() == (4, 8)
    assert UNetConfig.from_diffusers({**SD2_TINY, "num_attention_heads": None}).heads() == (2, 4)


def test_family_configs_round_trip_through_json():
    for d in (SD21, SDXL, SDXL_REFINER, SD2_TINY, SDXL_TINY):
        cfg = UNetConfig.from_diffusers(d)
        assert UNetConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    sd21, sdxl = UNetConfig.from_diffusers(SD21), UNetConfig.from_diffusers(SDXL)
    assert (sd21.sample_size, sd21.cross_attention_dim, sd21.upcast_attention) == (96, 1024, True)
    assert (sdxl.sample_size, sdxl.cross_attention_dim, sdxl.upcast_attention) == (128, 2048, False)
    assert sdxl.depths() == (1, 2, 10) and sdxl.attention_levels == (False, True, True)
    assert (sdxl.addition_embed_type, sdxl.addition_time_embed_dim,
            sdxl.projection_class_embeddings_input_dim) == ("text_time", 256, 2816)


@pytest.mark.slow
@pytest.mark.parametrize("name, config, count", [
    ("SD 2.1", SD21, 865_910_724),
    ("SDXL base", SDXL, 2_567_463_684),
    ("SDXL refiner", SDXL_REFINER, None),    # asserted equal to diffusers' own
])
def test_full_size_keys_shapes_and_parameter_count(name, config, count):
    start = time.perf_counter()
    counts = {}
    for in_channels in (4, 9):
        d = {**config, "in_channels": in_channels}
        with torch.device("meta"):
            ref = UNet2DConditionModel(**d)
            ours = UNet(UNetConfig.from_diffusers(d))
        ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
        our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
        assert set(our_shapes) == set(ref_shapes)
        assert our_shapes == ref_shapes
        n = sum(p.numel() for p in ours.parameters())
        assert n == sum(p.numel() for p in ref.parameters())
        counts[in_channels] = n
    if count is not None:
        assert counts[4] == count
    assert counts[9] == counts[4] + 5 * config["block_out_channels"][0] * 3 * 3  # 5 more input channels in conv_in
    print(f"{name}: {counts[4]:,} parameters ({counts[9]:,} with 9 input channels), "
          f"{time.perf_counter() - start:.2f} s")


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_image"),
    ("class_embed_type", "projection"),
    ("reverse_transformer_layers_per_block", [[10, 10, 10], [2, 2, 2], [1, 1, 1]]),
    ("transformer_layers_per_block", [[1, 1], [2, 2], [10, 10]]),
    ("resnet_time_scale_shift", "scale_shift"),
    ("encoder_hid_dim_type", "text_proj"),
    ("addition_time_embed_dim", 7),
])
def test_unsupported_options_still_refused(key, value):
    with pytest.raises(ValueError, match=f"unsupported UNet option {key}"):
        UNetConfig.from_diffusers({**SDXL, key: value})
