"""
model/speed.py and StableDiffusion.optimize: with every speed lever on, the networks still equal diffusers
within the parity tolerances, and their state_dict keys (the checkpoint layout) do not change.
Small models only; the speed itself is measured by bench/unet_step.py and bench/txt2img_vs_diffusers.py.
"""

import numpy as np
import pytest
import torch

from model import StableDiffusion
from model.speed import optimize_unet
from test_pipeline import SIZE, pixels, tiny_reference
from test_unet import TINY, TOL, reference_and_ours


def test_channels_last_unet_matches_diffusers_and_keeps_its_keys():
    ref, ours = reference_and_ours(TINY, seed=4)
    keys = list(ours.state_dict())
    optimize_unet(ours, channels_last=True)
    assert list(ours.state_dict()) == keys
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        want = ref(x, torch.tensor([10, 900]), encoder_hidden_states=ctx).sample
        got = ours(x, torch.tensor([10, 900]), ctx)
        got_cl = ours(x.to(memory_format=torch.channels_last), torch.tensor([10, 900]), ctx)
    assert (got - want).abs().max().item() < TOL
    assert (got_cl - want).abs().max().item() < TOL


def test_compiled_unet_matches_diffusers_and_keeps_its_keys():
    """torch.compile (inductor, weights frozen on CPU): the same outputs, the same state_dict keys."""
    ref, ours = reference_and_ours(TINY, seed=6)
    keys = list(ours.state_dict())
    optimize_unet(ours, compile=True)
    assert list(ours.state_dict()) == keys          # nn.Module.compile: no "_orig_mod." prefix
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        want = ref(x, torch.tensor([10, 900]), encoder_hidden_states=ctx).sample
        got = ours(x, torch.tensor([10, 900]), ctx)
    assert (got - want).abs().max().item() < TOL


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tiny_reference(tmp_path_factory.mktemp("speed_pipe"))


def test_optimized_pipeline_txt2img_equals_diffusers(reference):
    ref, folder = reference
    pipe = StableDiffusion.from_pretrained(folder).optimize(channels_last=True)
    expected = ref("a large red circle in the center", negative_prompt="blurry", num_inference_steps=4,
                   guidance_scale=7.5, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(42)).images[0]
    (got,) = pipe.txt2img("a large red circle in the center", negative_prompt="blurry", steps=4, guidance_scale=7.5,
                          seed=42, width=SIZE, height=SIZE)
    assert pixels(got).std() > 1
    assert np.abs(pixels(expected) - pixels(got)).max() <= 2


def test_worker_turns_on_the_levers_it_is_given(tiny_weights):
    from service.settings import Settings
    from service.worker import load_pipeline

    plain = load_pipeline(Settings(weights=str(tiny_weights), device="cpu"))
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast = load_pipeline(Settings.from_env({"SD_WEIGHTS": str(tiny_weights), "SD_DEVICE": "cpu",
                                            "SD_OPTIMIZE": "channels_last"}))
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a = plain.txt2img("a red circle", steps=2, seed=3)[0]
    b = fast.txt2img("a red circle", steps=2, seed=3)[0]
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


@pytest.mark.parametrize("bad", ["fast", "compile,x", "none,compile"])
def test_bad_optimize_setting_is_named(bad):
    from service.settings import Settings

    with pytest.raises(ValueError, match="optimize must be"):
        Settings(optimize=bad)
