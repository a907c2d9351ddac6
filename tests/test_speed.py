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
from model.speed import TunedConv2d, optimize_unet, prepack_convs, tune_convs
from model.tuning import Fixed, Tuner
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
    """How many convolutions of each kind: {"prepacked": n, "plain k x k": n, "plain 1x1": n, "both": n}
    (a TunedConv2d counts by the weight forms it holds)."""
    kinds = {"prepacked": 0, "plain k x k": 0, "plain 1x1": 0, "both": 0}
    for m in module.modules():
        if isinstance(m, TunedConv2d) and m.forms != {"plain"}:
            kinds["both" if m.forms == {"plain", "prepacked"} else "prepacked"] += 1
        elif isinstance(m, (nn.Conv2d, TunedConv2d)):
            kinds["plain 1x1" if m.kernel_size == (1, 1) else "plain k x k"] += 1
    return kinds


def test_prepacked_unet_matches_diffusers_and_keeps_its_state_dict():
    ref, ours = reference_and_ours(TINY, seed=8)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    optimize_unet(ours, prepack=True)
    kinds = kinds_of_convs(ours)
    assert kinds["prepacked"] >= 10 and kinds["plain k x k"] == 0 and kinds["plain 1x1"] >= 1   # 1x1 left alone
    assert not any(isinstance(m, TunedConv2d) and m.kernel_size == (1, 1) for m in ours.modules())
    after = ours.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)   # the plain weights come back exactly
    assert_same_outputs(ref, ours, seed=9)


class ByKernel:
    """A tuner for tests: prepacked for 3x3 convs fed 16x16 inputs, plain for everything else."""
    initial = "plain"

    def run(self, key, candidates):
        name = "prepacked" if "k3x3" in key and "x16x16 " in key else "plain"
        return name, candidates[name]()


def test_tuned_unet_holds_the_forms_its_shapes_chose_and_matches_diffusers():
    ref, ours = reference_and_ours(TINY, seed=10)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    tune_convs(ours, ByKernel())
    assert kinds_of_convs(ours)["prepacked"] == 0                   # nothing packed before a first call
    assert_same_outputs(ref, ours, seed=11)                         # latents 16x16; the UNet's inner level 8x8
    kinds = kinds_of_convs(ours)
    assert kinds["prepacked"] >= 3 and kinds["plain k x k"] >= 3 and kinds["both"] == 0
    packed16 = [m for m in ours.modules() if isinstance(m, TunedConv2d) and m.forms == {"prepacked"}]
    x = torch.randn(1, packed16[0].in_channels, 8, 8)               # a shape this layer has not seen: plain
    with torch.inference_mode():
        want = nn.functional.conv2d(x, packed16[0].weight, packed16[0].bias, packed16[0].stride, packed16[0].padding)
        assert (packed16[0](x) - want).abs().max().item() < 1e-5
    assert packed16[0].forms == {"plain", "prepacked"}              # both, only where shapes disagree
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_measured_unet_matches_diffusers_and_runs_what_it_chose():
    """The real Tuner on this machine: whatever it picks, the outputs are diffusers' and the same every call."""
    ref, ours = reference_and_ours(TINY, seed=12)
    tuner = Tuner(cache=None)
    tune_convs(ours, tuner)
    assert_same_outputs(ref, ours, seed=13)
    assert tuner.choices and set(tuner.choices.values()) <= {"plain", "prepacked"}
    assert set(tuner.timings) == set(tuner.choices)                  # every choice was measured here
    for key, times in tuner.timings.items():                         # the choice is never the slower one
        assert times[tuner.choices[key]] <= times["plain"]
    g = torch.Generator().manual_seed(14)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.inference_mode():
        first, again = ours(x, torch.tensor([10, 900]), ctx), ours(x, torch.tensor([10, 900]), ctx)
    assert torch.equal(first, again)                                 # decided: same kernels, same bits


def test_prepacked_convs_load_new_weights_and_refuse_what_they_cannot_hold():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False))
    packed = prepack_convs(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1),
                                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)))
    assert kinds_of_convs(packed)["prepacked"] == 2
    packed.load_state_dict(plain.state_dict())      # repacks: now it computes plain's convolution
    assert kinds_of_convs(packed)["prepacked"] == 2
    x = torch.randn(1, 4, 9, 9)
    with torch.inference_mode():
        assert (packed(x) - plain(x)).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match=r"size mismatch for 1.weight"):
        packed.load_state_dict({**plain.state_dict(), "1.weight": torch.zeros(8, 8, 5, 5)})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\b1.weight"):
        packed.load_state_dict({"0.weight": plain[0].weight, "0.bias": plain[0].bias})
    with pytest.raises(RuntimeError, match="move or cast the model before optimize"):
        packed.half()
    assert kinds_of_convs(prepack_convs(nn.Sequential(nn.Conv2d(4, 8, 3).to(torch.bfloat16))))["prepacked"] == 0
    assert not isinstance(tune_convs(nn.Sequential(nn.Conv2d(4, 8, 3).to(torch.bfloat16)))[0], TunedConv2d)


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
    pipe = StableDiffusion.from_pretrained(folder).optimize(channels_last=True)    # and measured convs, by default
    assert isinstance(pipe.tuner, Tuner)
    expected = ref("a large red circle in the center", negative_prompt="blurry", num_inference_steps=4,
                   guidance_scale=7.5, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(42)).images[0]
    (got,) = pipe.txt2img("a large red circle in the center", negative_prompt="blurry", steps=4, guidance_scale=7.5,
                          seed=42, width=SIZE, height=SIZE)
    assert pixels(got).std() > 1
    assert np.abs(pixels(expected) - pixels(got)).max() <= 2
    tuned = [m for m in [*pipe.unet.modules(), *pipe.vae.modules()] if isinstance(m, TunedConv2d)]
    assert len(tuned) >= 20 and all(not isinstance(m, nn.Conv2d) for m in tuned)
    assert pipe.tuner.choices                                              # shapes measured on the way


def test_worker_turns_on_the_levers_it_is_given(tiny_weights):
    from service.settings import Settings
    from service.worker import load_pipeline

    def load(optimize):
        return load_pipeline(Settings.from_env({"SD_WEIGHTS": str(tiny_weights), "SD_DEVICE": "cpu",
                                                "SD_OPTIMIZE": optimize}))

    plain, auto, packed, cl = load("none"), load(Settings().optimize), load("prepack"), load("channels_last")
    assert Settings().optimize == "auto"
    assert not any(isinstance(m, TunedConv2d) for m in [*plain.unet.modules(), *plain.vae.modules()])
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(auto.tuner, Tuner) and isinstance(auto.unet.conv_in, TunedConv2d)   # auto: measured
    assert auto.unet.conv_in.tuner is auto.vae.decoder.conv_in.tuner is auto.tuner          # one tuner a model
    assert isinstance(packed.unet.conv_in.tuner, Fixed)                                     # named: not measured
    assert kinds_of_convs(packed.unet)["plain k x k"] == kinds_of_convs(packed.vae)["plain k x k"] == 0
    assert not any(isinstance(m, TunedConv2d) for m in cl.unet.modules())   # a list names every lever wanted
    assert cl.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert cl.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a = plain.txt2img("a red circle", steps=2, seed=3)[0]
    assert pixels(a).std() > 1
    for fast in (auto, packed, cl):
        assert np.abs(pixels(a) - pixels(fast.txt2img("a red circle", steps=2, seed=3)[0])).max() <= 1


@pytest.mark.parametrize("bad", ["fast", "compile,x", "none,compile", "prepack,prepack", ""])
def test_bad_optimize_setting_is_named(bad):
    from service.settings import Settings

    with pytest.raises(ValueError, match="optimize must be"):
        Settings(optimize=bad)


def test_optimize_setting_becomes_the_levers_of_pipe_optimize():
    from service.settings import Settings

    assert Settings().levers() == {}                                 # auto: pipe.optimize()'s defaults
    assert Settings(optimize="none").levers() == {"prepack": False, "compile": False, "channels_last": False,
                                                  "aot": False}
    assert Settings(optimize=" compile, channels_last").levers() == {"prepack": False, "compile": True,
                                                                     "channels_last": True, "aot": False}


def test_nothing_is_prepacked_where_torch_has_no_onednn(monkeypatch):
    """A torch build without oneDNN (or one whose prepacked op fails its probe) keeps plain convolutions."""
    from model import speed

    speed.prepacking_works.cache_clear()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(torch.backends.mkldnn, "is_available", lambda: False)
            model = prepack_convs(nn.Sequential(nn.Conv2d(4, 8, 3)))
        assert kinds_of_convs(model) == {"prepacked": 0, "plain k x k": 1, "plain 1x1": 0, "both": 0}
        assert type(model[0]) is nn.Conv2d
    finally:
        speed.prepacking_works.cache_clear()
    state = torch.random.get_rng_state()
    assert speed.prepacking_works()                       # this build: yes, and the probe used no global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
