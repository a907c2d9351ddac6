"""
model/speed.py and StableDiffusion.optimize: with every speed lever on, the networks still equal diffusers
within the parity tolerances, and their state_dict keys (the checkpoint layout) do not change.
Small models only; the speed itself is measured by bench/unet_step.py and bench/txt2img_vs_diffusers.py.
"""

import numpy as np
import pytest
import torch

import torch.nn as nn

from model import StableDiffusion
from model.speed import PrepackedConv2d, optimize_unet, prepack_convs
from test_pipeline import SIZE, pixels, tiny_reference
from test_unet import TINY, TOL, reference_and_ours


def assert_same_outputs(ref, ours, seed):
    """Our UNet equals diffusers' within TOL, fed NCHW and channels_last inputs."""
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        want = ref(x, torch.tensor([10, 900]), encoder_hidden_states=ctx).sample
        for x_in in (x, x.to(memory_format=torch.channels_last)):
            assert (ours(x_in, torch.tensor([10, 900]), ctx) - want).abs().max().item() < TOL


def test_channels_last_unet_matches_diffusers_and_keeps_its_keys():
    ref, ours = reference_and_ours(TINY, seed=4)
    keys = list(ours.state_dict())
    optimize_unet(ours, channels_last=True)
    assert list(ours.state_dict()) == keys
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_outputs(ref, ours, seed=5)


def kinds_of_convs(module):
    """How many convolutions of each kind: {"prepacked": n, "plain k x k": n, "plain 1x1": n}."""
    kinds = {"prepacked": 0, "plain k x k": 0, "plain 1x1": 0}
    for m in module.modules():
        if isinstance(m, PrepackedConv2d):
            kinds["prepacked"] += 1
        elif isinstance(m, nn.Conv2d):
            kinds["plain 1x1" if m.kernel_size == (1, 1) else "plain k x k"] += 1
    return kinds


def test_prepacked_unet_matches_diffusers_and_keeps_its_state_dict():
    ref, ours = reference_and_ours(TINY, seed=8)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    optimize_unet(ours, prepack=True)
    kinds = kinds_of_convs(ours)
    assert kinds["prepacked"] >= 10 and kinds["plain k x k"] == 0 and kinds["plain 1x1"] >= 1   # 1x1 left alone
    after = ours.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)   # the plain weights come back exactly
    assert_same_outputs(ref, ours, seed=9)


def test_prepacked_convs_load_new_weights_and_refuse_what_they_cannot_hold():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False))
    packed = prepack_convs(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1),
                                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)))
    packed.load_state_dict(plain.state_dict())      # repacks: now it computes plain's convolution
    x = torch.randn(1, 4, 9, 9)
    with torch.inference_mode():
        assert (packed(x) - plain(x)).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match=r"size mismatch for 1.weight"):
        packed.load_state_dict({**plain.state_dict(), "1.weight": torch.zeros(8, 8, 5, 5)})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\b1.weight"):
        packed.load_state_dict({"0.weight": plain[0].weight, "0.bias": plain[0].bias})
    with pytest.raises(RuntimeError, match="move or cast the model before prepacking"):
        packed.half()
    assert kinds_of_convs(prepack_convs(nn.Sequential(nn.Conv2d(4, 8, 3).to(torch.bfloat16))))["prepacked"] == 0


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
    pipe = StableDiffusion.from_pretrained(folder).optimize(channels_last=True)    # and prepack, by default
    assert kinds_of_convs(pipe.unet)["plain k x k"] == kinds_of_convs(pipe.vae)["plain k x k"] == 0
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

    def load(optimize):
        return load_pipeline(Settings.from_env({"SD_WEIGHTS": str(tiny_weights), "SD_DEVICE": "cpu",
                                                "SD_OPTIMIZE": optimize}))

    plain, auto, cl = load("none"), load(Settings().optimize), load("channels_last")
    assert Settings().optimize == "auto"
    assert kinds_of_convs(plain.unet)["prepacked"] == kinds_of_convs(plain.vae)["prepacked"] == 0
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert kinds_of_convs(auto.unet)["plain k x k"] == kinds_of_convs(auto.vae)["plain k x k"] == 0
    assert kinds_of_convs(cl.unet)["prepacked"] == 0         # a list names every lever wanted
    assert cl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a = plain.txt2img("a red circle", steps=2, seed=3)[0]
    assert pixels(a).std() > 1
    for fast in (auto, cl):
        assert np.abs(pixels(a) - pixels(fast.txt2img("a red circle", steps=2, seed=3)[0])).max() <= 1


@pytest.mark.parametrize("bad", ["fast", "compile,x", "none,compile", "prepack,prepack", ""])
def test_bad_optimize_setting_is_named(bad):
    from service.settings import Settings

    with pytest.raises(ValueError, match="optimize must be"):
        Settings(optimize=bad)


def test_optimize_setting_becomes_the_levers_of_pipe_optimize():
    from service.settings import Settings

    assert Settings().levers() == {}                                 # auto: pipe.optimize()'s defaults
    assert Settings(optimize="none").levers() == {"prepack": False, "compile": False, "channels_last": False}
    assert Settings(optimize=" compile, channels_last").levers() == {"prepack": False, "compile": True,
                                                                     "channels_last": True}


def test_nothing_is_prepacked_where_torch_has_no_onednn(monkeypatch):
    """A torch build without oneDNN (or one whose prepacked op fails its probe) keeps plain convolutions."""
    from model import speed

    speed.prepacking_works.cache_clear()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(torch.backends.mkldnn, "is_available", lambda: False)
            model = prepack_convs(nn.Sequential(nn.Conv2d(4, 8, 3)))
        assert kinds_of_convs(model) == {"prepacked": 0, "plain k x k": 1, "plain 1x1": 0}
    finally:
        speed.prepacking_works.cache_clear()
    state = torch.random.get_rng_state()
    assert speed.prepacking_works()                       # this build: yes, and the probe used no global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
