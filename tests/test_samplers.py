"""
Parity of model/samplers.py with diffusers' schedulers, each made `from_config` of SD 1.5's
scheduler_config.json: the same timesteps and sigmas, and the same latents after every step of a
sampling loop driven by a fake deterministic eps-model (stochastic samplers: the same noise draws,
from identically seeded generators). diffusers is a test-only dependency.

diffusers' DDIM, DDPM and DPM-Solver keep variance-preserving latents x / sqrt(sigma^2 + 1);
Euler and Euler ancestral keep sigma-space x itself. Comparisons are made in diffusers' convention.
"""

import pytest
import torch
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
    finish,
    plan,
    run,
    scale_model_input,
    start,
    to_x0,
)

TOL = 1e-5  # max abs difference, fp32

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}

DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
REFERENCE = {  # sampler -> (diffusers scheduler, from_config overrides)
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler_a_karras": (EulerAncestralDiscreteScheduler, {}),  # sigmas swapped in, see reference()
    "dpmpp_2m": (DPMSolverMultistepScheduler, DPMPP),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**DPMPP, "use_karras_sigmas": True}),
}
VP = {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras"}  # diffusers keeps x / sqrt(sigma^2 + 1)
STOCHASTIC = {"ddpm", "euler_a", "euler_a_karras"}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' np.array(tensor)


def reference(sampler, steps, config=SD15):
    """The diffusers scheduler for `sampler`, with set_timesteps(steps) done."""
    cls, overrides = REFERENCE[sampler]
    sched = cls.from_config(config, **overrides)
    sched.set_timesteps(steps)
    if sampler == "euler_a_karras":  # EulerAncestralDiscreteScheduler has no Karras option:
        karras = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)  # borrow its sigmas
        karras.set_timesteps(steps)
        sched.sigmas, sched.timesteps = karras.sigmas, karras.timesteps
    return sched


def eps_model(x_in, t):
    """A fake UNet: deterministic, nonlinear, depends on the timestep. Mostly x_in, like the ideal
    eps-predictor for unit-variance data, so that latents stay O(1) and float32 rounding stays small."""
    return 0.9 * x_in + 0.1 * torch.tanh(3 * x_in) + 0.01 * float(t) / 1000


def ref_loop(sampler, steps, noise, x0=None, strength=1.0, eta=0.0, seed=None, config=SD15, mask=None):
    """diffusers' txt2img (x0 None), img2img, or 4-channel inpaint (mask given) loop;
    returns the starting latents and every step's output."""
    sched = reference(sampler, steps, config)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:  # StableDiffusion{Img2Img,Inpaint}Pipeline.get_timesteps / prepare_latents
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        if mask is not None and strength == 1.0:
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    first, outs = latents, []
    kwargs = {}
    if sampler in STOCHASTIC or eta > 0:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    if sampler == "ddim":
        kwargs["eta"] = eta
    for i, t in enumerate(timesteps):
        eps = eps_model(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, **kwargs).prev_sample
        if mask is not None:  # StableDiffusionInpaintPipeline, num_channels_unet == 4
            known = x0
            if i < len(timesteps) - 1:
                known = sched.add_noise(x0, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - mask) * known + mask * latents
        outs.append(latents)
    return first, outs


def our_loop(sampler, steps, noise, x0=None, strength=1.0, eta=0.0, seed=None, config=SD15, mask=None):
    """The same loop with model/samplers.py, converted to diffusers' convention."""
    schedule = Schedule.from_diffusers(config)
    p = plan(sampler, steps, schedule, strength)
    if x0 is None or (mask is not None and strength == 1.0):
        x = start(p, noise)
    else:
        x = add_noise(p, x0, noise)
    renoise_known = None
    if mask is not None:
        def renoise_known(x, i):
            return mask * x + (1 - mask) * add_noise(p, x0, noise, step=i)
    states = []

    def denoise(x, i):
        states.append(x)
        sigma = p.sigmas[i]
        return to_x0(x, sigma, eps_model(scale_model_input(x, sigma), p.timesteps[i]), schedule.prediction_type)

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    new_noise = (lambda: torch.randn(noise.shape, generator=gen)) if gen is not None else None
    x = run(sampler, denoise, x, p, noise=new_noise, eta=eta, between_steps=renoise_known)
    states.append(x)
    if sampler in VP:
        states = [s / (p.sigmas[i] ** 2 + 1) ** 0.5 for i, s in enumerate(states)]
    assert torch.equal(finish(p, x), x if p.sigmas[-1] == 0 else states[-1])
    if mask is not None:  # the known region comes back clean
        states[-1] = mask * finish(p, x) + (1 - mask) * x0
    return states[0], states[1:], p


def assert_loops_match(sampler, steps, x0=None, strength=1.0, eta=0.0, config=SD15, mask=None):
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    seed = 1234 if (sampler in STOCHASTIC or eta > 0) else None
    ref_first, ref_outs = ref_loop(sampler, steps, noise, x0, strength, eta, seed, config, mask)
    first, outs, p = our_loop(sampler, steps, noise, x0, strength, eta, seed, config, mask)
    assert len(outs) == len(ref_outs) == p.steps
    err = max((a - b).abs().max().item() for a, b in zip([first] + outs, [ref_first] + ref_outs))
    assert err < TOL, f"{sampler} steps={steps} strength={strength}: max abs err {err:.2e}"
    ERRORS[sampler] = max(ERRORS.get(sampler, 0.0), err)
    return err


ERRORS = {}  # worst error per sampler, printed by test_zz_report_errors (pytest -s)


# -----------------------------------------------------------------------------
# schedule

def test_schedule_matches_diffusers_training_schedule():
    ref = DDIMScheduler.from_config(SD15)
    s = Schedule.from_diffusers(SD15)
    assert s == Schedule.sd15()
    assert torch.equal(s.alphas_cumprod(), ref.alphas_cumprod)
    assert torch.equal(s.sigmas(), EulerDiscreteScheduler.from_config(SD15).sigmas[:-1].flip(0))
    linear = {**SD15, "beta_schedule": "linear"}
    ref_linear = DDIMScheduler.from_config(linear).alphas_cumprod
    assert torch.equal(Schedule.from_diffusers(linear).alphas_cumprod(), ref_linear)
    assert Schedule(**s.to_dict()) == s
    bare = Schedule.from_diffusers({})  # missing keys: diffusers' defaults, as from_config({}) has them
    assert torch.equal(bare.alphas_cumprod(), DDIMScheduler.from_config({}).alphas_cumprod)
    assert bare.set_alpha_to_one and bare.steps_offset == 0


def test_missing_timestep_spacing_means_each_schedulers_default():
    # SD 1.5's config has no timestep_spacing: DDIM/DDPM then use "leading", Euler and DPM-Solver "linspace"
    assert Schedule.from_diffusers(SD15).timestep_spacing is None
    for sampler, expected in [("ddim", "leading"), ("ddpm", "leading"), ("euler", "linspace"),
                              ("euler_a", "linspace"), ("dpmpp_2m", "linspace")]:
        assert reference(sampler, 10).config.timestep_spacing == expected


@pytest.mark.parametrize("bad", [
    {"prediction_type": "sample"}, {"beta_schedule": "squaredcos_cap_v2"}, {"clip_sample": True},
    {"timestep_spacing": "evenly"}, {"thresholding": True}, {"rescale_betas_zero_snr": True},
    {"trained_betas": [0.1, 0.2]},
])
def test_unsupported_scheduler_options_raise(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key if key != "beta_schedule" else "beta_schedule"):
        Schedule.from_diffusers({**SD15, **bad})


# -----------------------------------------------------------------------------
# timesteps and sigmas

STEP_COUNTS = list(range(1, 61)) + [61, 75, 100, 128, 333, 500, 999]


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_timesteps_and_sigmas_match(sampler, spacing):
    config = SD15 if spacing is None else {**SD15, "timestep_spacing": spacing}
    schedule = Schedule.from_diffusers(config)
    train_sigmas = schedule.sigmas()
    for steps in STEP_COUNTS:
        ref, p = reference(sampler, steps, config), plan(sampler, steps, schedule)
        ref_t = ref.timesteps.float()
        if len(ref_t) == steps + 1:  # diffusers' "trailing" float arange sometimes adds a bogus t = -1
            assert spacing == "trailing" and ref_t[-1] == -1  # (steps = 61, 103, ...); we keep the
            ref_t = ref_t[:-1]                                  # requested steps
        if sampler == "euler_karras" or sampler == "euler_a_karras":
            # fractional timesteps from log-sigma interpolation: numpy's and torch's float32 log
            # differ in the last bit, so t may differ by an ulp or two
            torch.testing.assert_close(p.timesteps, ref_t, rtol=0, atol=1e-4)
        else:
            assert torch.equal(p.timesteps, ref_t), (steps, p.timesteps, ref_t)
        assert len(p.sigmas) == steps + 1
        if sampler in ("ddim", "ddpm"):  # sigma of each timestep; DDIM ends at alphas_cumprod[0]
            final = train_sigmas[0] if sampler == "ddim" else 0.0
            expected = torch.cat([train_sigmas[ref_t.long()], torch.tensor([final])])
        else:
            expected = torch.cat([ref.sigmas[:steps], ref.sigmas[-1:]])
        assert torch.equal(p.sigmas, expected), steps
        if sampler.startswith("euler"):
            assert p.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        else:
            assert ref.init_noise_sigma == 1.0
            assert p.init_noise_sigma == pytest.approx(float((p.sigmas[0] ** 2 + 1) ** 0.5), rel=1e-7)


# -----------------------------------------------------------------------------
# sampling loops

@pytest.mark.parametrize("steps", [1, 10, 25, 50])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_txt2img_loop_matches(sampler, steps):
    assert_loops_match(sampler, steps)


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_loop_matches(sampler, strength):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    assert_loops_match(sampler, 20, x0=x0, strength=strength)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpaint_loop_matches(sampler, strength):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1.0
    mask[1, :, :, 6:] = 0.5  # soft edge
    assert_loops_match(sampler, 15, x0=x0, strength=strength, mask=mask)


@pytest.mark.parametrize("steps", [1, 7, 30])
def test_ddim_eta_matches(steps):
    assert_loops_match("ddim", steps, eta=1.0)
    assert_loops_match("ddim", steps, eta=0.5)


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "ddpm", "dpmpp_2m", "euler_karras"])
def test_timestep_spacings_loop_matches(sampler, spacing):
    config = {**SD15, "timestep_spacing": spacing}
    for steps in (7, 30):  # 7, 30 do not divide 1000: DDIM lands off the next timestep with "trailing"
        assert_loops_match(sampler, steps, config=config)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert_loops_match(sampler, 30, x0=x0, strength=0.6, config=config)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_loop_matches(sampler):
    config = {**SD15, "prediction_type": "v_prediction"}
    assert_loops_match(sampler, 12, config=config)


def test_ddim_with_set_alpha_to_one_ends_at_sigma_zero():
    config = {**SD15, "set_alpha_to_one": True}
    assert plan("ddim", 10, Schedule.from_diffusers(config)).sigmas[-1] == 0
    assert_loops_match("ddim", 10, config=config)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_add_noise_matches_at_every_step(sampler):
    # inpainting re-noises the original latents to the level of any step
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    steps = 12
    ref, p = reference(sampler, steps), plan(sampler, steps)
    for i in range(steps):
        ours = add_noise(p, x0, noise, step=i)
        if sampler in VP:
            ours = ours / (p.sigmas[i] ** 2 + 1) ** 0.5
        theirs = ref.add_noise(x0, noise, ref.timesteps[i:i + 1].repeat(2))
        assert (ours - theirs).abs().max() < TOL, i


def test_strength_zero_is_zero_steps():
    x0 = torch.randn(1, 4, 8, 8)
    for sampler in SAMPLERS:
        p = plan(sampler, 25, strength=0.0)
        assert p.steps == 0 and len(p.sigmas) == 1
        x = add_noise(p, x0, torch.randn_like(x0))
        x = run(sampler, lambda x, i: pytest.fail("no step"), x, p, noise=lambda: torch.randn_like(x0))
        assert torch.equal(finish(p, x), x0)
    assert plan("euler", 25, strength=0.03).steps == 0  # int(0.75) = 0
    assert plan("euler", 25, strength=0.04).steps == 1


# -----------------------------------------------------------------------------
# API behaviour

def test_callback_reports_progress_and_can_cancel():
    p = plan("euler", 5)
    x = start(p, torch.randn(1, 4, 8, 8))
    seen = []
    run("euler", lambda x, i: seen.append(("denoise", i)) or x * 0, x, p, noise=None,
        callback=lambda done, total: seen.append((done, total)),
        between_steps=lambda x, i: seen.append(("between", i)) or x)
    assert seen == [("denoise", 0), (1, 5), ("between", 1), ("denoise", 1), (2, 5), ("between", 2),
                    ("denoise", 2), (3, 5), ("between", 3), ("denoise", 3), (4, 5), ("between", 4),
                    ("denoise", 4), (5, 5)]

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done == 2:
            raise Cancelled

    calls = []
    with pytest.raises(Cancelled):
        run("euler", lambda x, i: calls.append(i) or x * 0, x, p, noise=None, callback=cancel)
    assert calls == [0, 1]


def test_per_image_noise_keeps_batch_items_independent():
    # each image's noise comes from its own generator: image 0 is the same alone or in a batch
    def sample(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = lambda: torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])  # noqa: E731
        p = plan("euler_a", 10)
        x = start(p, noise())
        def denoise(x, i):
            return to_x0(x, p.sigmas[i], eps_model(scale_model_input(x, p.sigmas[i]), p.timesteps[i]))

        return run("euler_a", denoise, x, p, noise=noise)

    assert torch.equal(sample([5]), sample([5, 6])[:1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="valid: ddim, ddpm, euler"):
        plan("heun", 10)
    for steps in (0, -1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            plan("euler", steps)
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            plan("euler", 10, strength=strength)
    p = plan("euler", 10)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="valid:"):
        run("lms", lambda x, i: x, x, p, noise=None)
    with pytest.raises(ValueError, match="plan was made for"):
        run("ddim", lambda x, i: x, x, p, noise=None)
    with pytest.raises(ValueError, match="eta"):
        run("euler", lambda x, i: x, x, p, noise=None, eta=0.5)
    with pytest.raises(ValueError, match="needs noise"):
        run("euler_a", lambda x, i: x, x, plan("euler_a", 10), noise=None)
    with pytest.raises(ValueError, match="needs noise"):
        run("ddim", lambda x, i: x, x, plan("ddim", 10), noise=None, eta=1.0)
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0(x, 1.0, x, "sample")
    with pytest.raises(ValueError, match="leading"):  # diffusers would give all-equal timesteps, NaNs
        plan("dpmpp_2m", 1000, Schedule(timestep_spacing="leading"))


def test_zz_report_errors():
    print("\nmax abs error per sampler over the loop tests:", {k: f"{v:.1e}" for k, v in ERRORS.items()})
