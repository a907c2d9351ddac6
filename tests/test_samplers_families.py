"""
Schedules of the model families (issue 15, item 4): every sampler with prediction_type "epsilon" and
"v_prediction", under each timestep_spacing ("leading" with steps_offset, "trailing", "linspace"),
against the matching diffusers scheduler built from the same scheduler_config dict; SD 2.1's and
SDXL's published scheduler_config.json; and clear refusals of what is not supported.

The "model" is a fixed deterministic function of (x, t), a small random conv plus a timestep term,
the same on both sides. Stochastic samplers draw their noise from identically seeded generators on
both sides, in the same order, so they are compared as tightly as the deterministic ones.
Comparisons are made in diffusers' latent convention (VP latents for DDIM, DDPM, DPM-Solver).
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from model.samplers import (
    SAMPLERS,
    Schedule,
    add_noise,
    plan,
    run,
    scale_model_input,
    start,
    to_x0,
)

# The samplers' arithmetic differs from diffusers' only in float32 rounding order; measured worst
# case is ~1e-5 (latents are O(1)..O(15)), so 1e-4 leaves room for other CPUs' math libraries.
TOL = 1e-4

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json. Not read from the Hugging Face repo
# itself (no network here): this is the dict as two independent public projects quote it verbatim;
# every field that changes sampling (betas, v_prediction, steps_offset, set_alpha_to_one, no
# timestep_spacing) agrees with the SD 2.x model card and diffusers' docs.
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (quoted verbatim by
# several public projects)
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
REFERENCE = {  # sampler -> (diffusers scheduler, from_config overrides)
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler_a_karras": (EulerAncestralDiscreteScheduler, {}),  # no Karras option: sigmas borrowed below
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**DPMPP, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**DPMPP, "use_karras_sigmas": True}),
}
VP = {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras"}  # diffusers keeps x / sqrt(sigma^2 + 1)
STOCHASTIC = {"ddpm", "euler_a", "euler_a_karras"}
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' np.array(tensor)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are 2x4x8x8: intra-op threads only contend (10x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference(sampler, steps, config):
    """diffusers' scheduler for `sampler` from `config`, with set_timesteps(steps) done."""
    cls, overrides = REFERENCE[sampler]
    sched = cls.from_config(config, **overrides)
    sched.set_timesteps(steps)
    if sampler == "euler_a_karras":
        karras = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
        karras.set_timesteps(steps)
        sched.sigmas, sched.timesteps = karras.sigmas, karras.timesteps
    return sched


_W = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1


def toy_model(x_in, t):
    """A fixed stand-in UNet: deterministic in (x_in, t), nonlinear, mixes neighbouring pixels and
    channels. Its output is read as eps or as v, whichever the schedule says."""
    return 0.8 * x_in + 0.2 * torch.tanh(F.conv2d(x_in, _W, padding=1)) + 0.05 * torch.sin(torch.tensor(float(t) / 80))


def ref_loop(sampler, steps, config, noise, seed, x0=None, strength=1.0, eta=0.0):
    """diffusers' txt2img (x0 None) or img2img loop: timesteps, and the latents before and after every step."""
    sched = reference(sampler, steps, config)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):  # DDIM and DDPM have none: they look t up
            sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    kwargs = {"generator": torch.Generator().manual_seed(seed)}
    if sampler == "ddim":
        kwargs["eta"] = eta
    states = [latents]
    for t in timesteps:
        out = toy_model(sched.scale_model_input(latents, t), t)
        latents = sched.step(out, t, latents, **kwargs).prev_sample
        states.append(latents)
    return timesteps, states


def our_loop(sampler, steps, config, noise, seed, x0=None, strength=1.0, eta=0.0):
    """The same with model/samplers.py, driven as model/pipeline.py drives it, in diffusers' convention."""
    schedule = Schedule.from_diffusers(config)
    p = plan(sampler, steps, schedule, strength)
    x = start(p, noise) if x0 is None else add_noise(p, x0, noise)
    states = []

    def denoise(x, i):
        states.append(x)
        sigma = p.sigmas[i]
        return to_x0(x, sigma, toy_model(scale_model_input(x, sigma), p.timesteps[i]), schedule.prediction_type)

    gen = torch.Generator().manual_seed(seed)
    x = run(sampler, denoise, x, p, noise=lambda: torch.randn(noise.shape, generator=gen), eta=eta)
    states.append(x)
    if sampler in VP:
        states = [s / (p.sigmas[i] ** 2 + 1) ** 0.5 for i, s in enumerate(states)]
    return p.timesteps, states


ERRORS = {}  # (sampler, spacing, prediction_type) -> worst max abs diff, printed by test_zz_report


def compare(sampler, steps, config, x0=None, strength=1.0, eta=0.0, key=None):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ref_t, ref_states = ref_loop(sampler, steps, config, noise, 1234, x0, strength, eta)
    our_t, our_states = our_loop(sampler, steps, config, noise, 1234, x0, strength, eta)
    ref_t = ref_t.float()
    if sampler in ("euler_karras", "euler_a_karras"):
        # fractional timesteps from log-sigma interpolation: numpy's and torch's float32 log may
        # differ in the last bit
        torch.testing.assert_close(our_t, ref_t, rtol=0, atol=1e-4)
    else:
        assert torch.equal(our_t, ref_t), (our_t, ref_t)
    assert len(our_states) == len(ref_states)
    err = max((a - b).abs().max().item() for a, b in zip(our_states, ref_states))
    assert err < TOL, f"{sampler} {key} steps={steps} strength={strength} eta={eta}: max abs diff {err:.2e}"
    if key is not None:
        ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    return err


# -----------------------------------------------------------------------------
# 1. every sampler x prediction type x timestep spacing

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_matches_diffusers(sampler, prediction_type, spacing):
    config = {**SD15, "prediction_type": prediction_type, "timestep_spacing": spacing}
    key = (sampler, spacing, prediction_type)
    for steps in (1, 7, 30):  # 7, 30 do not divide 1000 ("trailing" DDIM lands between timesteps)
        compare(sampler, steps, config, key=key)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    compare(sampler, 20, config, x0=x0, strength=0.6, key=key)  # img2img: a later start, add_noise


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_eta_matches_diffusers(prediction_type, spacing):
    config = {**SD15, "prediction_type": prediction_type, "timestep_spacing": spacing}
    for eta in (0.5, 1.0):
        compare("ddim", 9, config, eta=eta, key=("ddim eta>0", spacing, prediction_type))


def test_the_conversion_is_the_one_place_prediction_type_enters():
    # x0 from the model output: epsilon x = x0 + sigma eps; v = sqrt(a) eps - sqrt(1-a) x0 on the VP
    # latent sqrt(a) x0 + sqrt(1-a) eps, a = 1 / (1 + sigma^2)
    x0, eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)).unbind(0)
    for sigma in (0.03, 1.0, 14.6):
        a = 1 / (1 + sigma ** 2)
        x = x0 + sigma * eps
        v = a ** 0.5 * eps - (1 - a) ** 0.5 * x0
        torch.testing.assert_close(to_x0(x, sigma, eps, "epsilon"), x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(to_x0(x, sigma, v, "v_prediction"), x0, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# 2. the published configs

FAMILIES = {"sd21": SD21, "sdxl": SDXL}


@pytest.mark.parametrize("family", FAMILIES)
def test_published_config_loads(family):
    config = FAMILIES[family]
    s = Schedule.from_diffusers(config)
    assert s.prediction_type == config["prediction_type"]
    assert s.timestep_spacing == config.get("timestep_spacing")
    assert s.steps_offset == 1 and not s.set_alpha_to_one
    ref = DDIMScheduler.from_config(config)
    assert torch.equal(s.alphas_cumprod(), ref.alphas_cumprod)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_published_config_gives_diffusers_timesteps(family, sampler):
    config = FAMILIES[family]
    schedule = Schedule.from_diffusers(config)
    for steps in (1, 4, 20, 25, 30, 50, 77):
        ref_t = reference(sampler, steps, config).timesteps.float()
        ours = plan(sampler, steps, schedule).timesteps
        if sampler in ("euler_karras", "euler_a_karras"):
            torch.testing.assert_close(ours, ref_t, rtol=0, atol=1e-4)
        else:
            assert torch.equal(ours, ref_t), (steps, ours, ref_t)


def test_published_configs_sample_as_diffusers():
    # the schedulers these weights ship with, as published: SD 2.1 = DDIM with v_prediction,
    # SDXL = Euler with "leading" spacing (init_noise_sigma sqrt(sigma_max^2 + 1))
    compare("ddim", 25, SD21, key=("ddim", "sd21", "v_prediction"))
    compare("euler", 25, SDXL, key=("euler", "sdxl", "epsilon"))
    compare("dpmpp_2m_karras", 25, SD21, key=("dpmpp_2m_karras", "sd21", "v_prediction"))
    compare("euler_a", 25, SDXL, key=("euler_a", "sdxl", "epsilon"))


# -----------------------------------------------------------------------------
# 3. refusals name the field and what is allowed

@pytest.mark.parametrize("bad", ["sample", "x0", "flow", ""])
def test_unknown_prediction_type_refused(bad):
    for make in (lambda: Schedule.from_diffusers({**SD21, "prediction_type": bad}),
                 lambda: Schedule(prediction_type=bad)):
        with pytest.raises(ValueError) as e:
            make()
        msg = str(e.value)
        assert "prediction_type" in msg and repr(bad) in msg
        assert "epsilon" in msg and "v_prediction" in msg
    with pytest.raises(ValueError, match="prediction_type.*epsilon.*v_prediction"):
        to_x0(torch.zeros(1), 1.0, torch.zeros(1), bad)


@pytest.mark.parametrize("bad", ["evenly", "Leading", "karras", ""])
def test_unknown_timestep_spacing_refused(bad):
    for make in (lambda: Schedule.from_diffusers({**SDXL, "timestep_spacing": bad}),
                 lambda: Schedule(timestep_spacing=bad)):
        with pytest.raises(ValueError) as e:
            make()
        msg = str(e.value)
        assert "timestep_spacing" in msg and repr(bad) in msg
        assert all(s in msg for s in SPACINGS)


@pytest.mark.parametrize("key,value", [
    ("rescale_betas_zero_snr", True), ("interpolation_type", "log_linear"), ("timestep_type", "continuous"),
    ("final_sigmas_type", "sigma_min"), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
    ("lambda_min_clipped", -5.1), ("use_flow_sigmas", True), ("use_dynamic_shifting", True),
])
def test_options_that_change_the_result_but_are_not_implemented_are_refused(key, value):
    with pytest.raises(ValueError) as e:
        Schedule.from_diffusers({**SDXL, key: value})
    assert key in str(e.value) and repr(value) in str(e.value)


def test_keys_that_do_not_change_the_result_are_ignored():
    # bookkeeping, PNDM-only, thresholding-only; the sampler (and so Karras sigmas, solver order) is
    # chosen by name, not by the scheduler class the config was saved from
    extra = {"_class_name": "PNDMScheduler", "skip_prk_steps": False, "sample_max_value": 2.0,
             "clip_sample_range": 3.0, "dynamic_thresholding_ratio": 0.9, "solver_order": 3,
             "_use_default_values": ["sigma_min"]}
    assert Schedule.from_diffusers({**SDXL, **extra}) == Schedule.from_diffusers(SDXL)


def test_zz_report():
    print("\nmax abs diff vs diffusers, (sampler, spacing, prediction_type):")
    for key, err in sorted(ERRORS.items()):
        print(f"  {key}: {err:.1e}")
