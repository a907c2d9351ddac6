"""
Stable Diffusion's noise schedules (1.x, 2.x, SDXL: one DDPM schedule, read from the weights'
scheduler_config.json) and samplers, in the style of k-diffusion's sampling.py.

Everything works in sigma space (Karras et al. 2022): a noisy latent is

    x = x0 + sigma * eps,        sigma^2 = (1 - alphas_cumprod[t]) / alphas_cumprod[t]

The UNet was trained on the variance-preserving latent sqrt(a) * x0 + sqrt(1 - a) * eps, which is
x / sqrt(sigma^2 + 1) (`scale_model_input`), and predicts eps (SD 1.x, SDXL, SD 2.x 512-base) or
v = sqrt(a) * eps - sqrt(1 - a) * x0 (SD 2.x 768-v): the schedule's prediction_type says which.
`to_x0` turns either into x0_hat, and is the only place prediction_type enters: a sampler is then a
short loop over a decreasing list of sigmas that only needs a denoiser `denoise(x, i) -> x0_hat` for
step i, the same for every model family. `plan()` picks the timesteps and sigmas exactly as
the matching diffusers scheduler does (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler), so the same UNet and noise give the
same latents as diffusers, to float rounding.

How the pipeline uses it (txt2img; cfg = classifier-free guidance):

    sched = Schedule.from_diffusers(scheduler_config) if scheduler_config else Schedule.sd15()
    p = plan(sampler, steps, sched)                       # img2img: plan(..., strength=s)
    noise = lambda: ...  # fresh unit noise shaped like x, from the requests' own torch.Generators
    x = start(p, noise())                                 # img2img: x = add_noise(p, x0, noise())
    def denoise(x, i):
        sigma, t = p.sigmas[i], p.timesteps[i]
        eps = cfg(unet(scale_model_input(x, sigma), t, context))
        return to_x0(x, sigma, eps, sched.prediction_type)
    x = run(sampler, denoise, x, p, noise=noise, eta=eta, callback=callback)
    latents = finish(p, x)                                # then vae.decode(latents / 0.18215)

img2img starts from x = add_noise(p, x0, n0) with n0 = noise(). Inpainting with a 4-channel UNet
(mask = 1 where the image is repainted) does as diffusers' StableDiffusionInpaintPipeline:

    x = start(p, n0) if strength == 1 else add_noise(p, x0, n0)
    def renoise_known(x, i):  # before step i >= 1: the known region at step i's noise level
        return mask * x + (1 - mask) * add_noise(p, x0, n0, step=i)
    x = run(sampler, denoise, x, p, noise=noise, between_steps=renoise_known)
    latents = mask * finish(p, x) + (1 - mask) * x0     # the known region comes back clean
"""

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

SAMPLERS = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "euler_karras", "euler_a_karras")

# -----------------------------------------------------------------------------
# the training noise schedule

# diffusers scheduler options that would change the result but are not implemented here, with the
# values supported (a missing key is fine). clip_sample and thresholding only make sense for
# pixel-space models; rescale_betas_zero_snr needs sigma = infinity at t = N-1, which sigma space
# cannot hold. Other keys do not change the result and are ignored: bookkeeping (_class_name, ...),
# PNDM's skip_prk_steps, thresholding's sample_max_value etc. The sampler, and so Karras sigmas,
# solver order etc., is chosen by name, not by the config's scheduler class or use_karras_sigmas.
_SUPPORTED_DIFFUSERS_OPTIONS = {
    "trained_betas": (None,),
    "clip_sample": (False,),
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "variance_type": (None, "fixed_small"),
    "lambda_min_clipped": (float("-inf"),),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
}
_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _one_of(values):
    return ", ".join(values[:-1]) + " or " + values[-1]


@dataclass
class Schedule:
    """The DDPM training schedule plus the scheduler options that change sampling.
    Defaults = SD 1.5's scheduler_config.json (runwayml/stable-diffusion-v1-5)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    steps_offset: int = 1                 # added to "leading" timesteps
    timestep_spacing: Optional[str] = None  # "leading" | "trailing" | "linspace"; None = key absent:
    # each diffusers scheduler's own default then applies: "leading" for DDIM/DDPM,
    # "linspace" for Euler, Euler ancestral and DPM-Solver++.
    prediction_type: str = "epsilon"      # or "v_prediction"
    set_alpha_to_one: bool = False        # DDIM's last step goes to alphas_cumprod = 1 (True) or [0]

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (scaled_linear, linear)")
        if self.timestep_spacing is not None and self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported "
                             f"(use {_one_of(_SPACINGS)}, or leave it out for the sampler's default)")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported "
                             f"(use {_one_of(_PREDICTION_TYPES)})")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @classmethod
    def sd15(cls):
        return cls()

    @classmethod
    def from_diffusers(cls, d: dict):
        """From a diffusers scheduler_config.json dict. A missing key takes diffusers' default, as
        `XScheduler.from_config(d)` would (so a bare {} is diffusers' linear schedule, not SD's).
        Read: the betas, prediction_type, timestep_spacing, steps_offset, set_alpha_to_one. The
        published configs differ, for sampling, only in these: SD 1.5 (PNDM, no timestep_spacing), SD 2.1 (DDIM,
        v_prediction, no timestep_spacing), SDXL base (Euler, "leading"), all with steps_offset 1.
        Options that would change the result but are not implemented are refused, naming the key."""
        for key, ok in _SUPPORTED_DIFFUSERS_OPTIONS.items():
            if key in d and d[key] not in ok:
                only = " or ".join(map(repr, ok))
                raise ValueError(f"scheduler option {key}={d[key]!r} is not supported (only {only})")
        return cls(
            num_train_timesteps=int(d.get("num_train_timesteps", 1000)),
            beta_start=float(d.get("beta_start", 0.0001)),
            beta_end=float(d.get("beta_end", 0.02)),
            beta_schedule=d.get("beta_schedule", "linear"),
            steps_offset=int(d.get("steps_offset", 0)),
            timestep_spacing=d.get("timestep_spacing"),
            prediction_type=d.get("prediction_type", "epsilon"),
            set_alpha_to_one=bool(d.get("set_alpha_to_one", True)),
        )

    def to_dict(self):
        return asdict(self)

    def alphas_cumprod(self) -> torch.Tensor:
        """[N] float32, a_t = prod_{s<=t} (1 - beta_s)."""
        N = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":  # linear in sqrt(beta)
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, N, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, N, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)

    def sigmas(self) -> torch.Tensor:
        """[N] float32, sigma of each training timestep t = 0..N-1 (increasing)."""
        a = self.alphas_cumprod()
        return ((1 - a) / a) ** 0.5


# -----------------------------------------------------------------------------
# the sigma-space conventions

def scale_model_input(x, sigma):
    """What the UNet sees: the variance-preserving latent sqrt(a) x0 + sqrt(1-a) eps = x / sqrt(sigma^2 + 1)."""
    return x / (sigma ** 2 + 1) ** 0.5


def to_x0(x, sigma, model_output, prediction_type="epsilon"):
    """The denoised estimate from the UNet's output at noise level sigma: the one place where the
    model's prediction_type enters; every sampler works on x0_hat. In k-diffusion's terms
    x0 = c_skip * x + c_out * model_output (its VDenoiser with sigma_data = 1 for v):
    epsilon:      x = x0 + sigma * eps                        =>  x0 = x - sigma * eps
    v_prediction: v = sqrt(a) eps - sqrt(1-a) x0 (VP latent)  =>  x0 = x / (sigma^2+1) - v * sigma / sqrt(sigma^2+1)"""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return x / (sigma ** 2 + 1) - model_output * sigma / (sigma ** 2 + 1) ** 0.5
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (use {_one_of(_PREDICTION_TYPES)})")


# -----------------------------------------------------------------------------
# planning: which timesteps and sigmas a sampler visits (exactly as diffusers does)

@dataclass
class Plan:
    """The steps one sampling run takes. n = len(timesteps), after img2img truncation."""
    sampler: str
    timesteps: torch.Tensor  # [n] float32, the UNet timestep of each step (diffusers' exact value)
    sigmas: torch.Tensor     # [n+1] float32, noise level of the state before each step, and after the last
    sigmas_to: torch.Tensor  # [n] float32, level each step lands on: sigmas[1:], except for DDIM with
    # "linspace"/"trailing" spacing, whose step lands at t - N//steps (see sample_ddim)
    init_noise_sigma: float  # txt2img start: x = init_noise_sigma * noise (diffusers' convention)

    @property
    def steps(self):
        return len(self.timesteps)


def _linspace(stop, n):
    """numpy.linspace(0, stop, n) in float64, with numpy's rounding (i * step, last = stop)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    y = torch.arange(n, dtype=torch.float64) * (stop / (n - 1))
    y[-1] = stop
    return y


def _arange_down(start, step):
    """numpy.arange(start, 0, -step) for a float step, with numpy's rounding (start + i * delta)."""
    n = math.ceil(start / step)
    delta = (start - step) - start
    y = start + torch.arange(n, dtype=torch.float64) * delta
    y[0] = start
    return y


def _timesteps(spacing, steps, schedule, extra=0, rounded=True):
    """Descending float64 timesteps. DPM-Solver spaces steps+1 points and drops t=0 (extra=1);
    Euler keeps "linspace" timesteps fractional (rounded=False)."""
    N, n = schedule.num_train_timesteps, steps + extra
    if spacing == "linspace":     # evenly over [0, N-1]
        t = _linspace(N - 1, n).flip(0)
        t = t.round() if rounded else t
    elif spacing == "leading":    # multiples of N // n, counted from 0, then shifted by steps_offset
        t = (torch.arange(n, dtype=torch.float64) * (N // n)).flip(0) + schedule.steps_offset
    else:                         # "trailing": multiples of N / steps counted down from N, minus 1
        # numpy's float arange sometimes yields one point too many, t = -1 (e.g. 61 steps), which
        # diffusers then runs as an extra step; plan() keeps the requested number of steps.
        return _arange_down(float(N), N / steps).round() - 1
    return t[:steps]


def _interp(values, t):
    """numpy.interp(t, arange(len(values)), values) in float64: piecewise linear, clamped at the ends."""
    v = values.double()
    t = t.double().clamp(0, len(v) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(v) - 1)
    return (v[hi] - v[lo]) * (t - lo) + v[lo]


def _sigma_to_t(sigma, train_sigmas):
    """The fractional timestep of each sigma: piecewise linear in log sigma between training timesteps."""
    log_train = train_sigmas.log().double()                     # [N] increasing
    log_s = sigma.double().clamp(min=1e-10).log()               # [n]
    lo = ((log_train[:, None] <= log_s[None]).sum(0) - 1).clamp(0, len(log_train) - 2)
    w = ((log_train[lo] - log_s) / (log_train[lo] - log_train[lo + 1])).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022 (eq. 5): n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = _linspace(1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def plan(sampler: str, steps: int, schedule: Optional[Schedule] = None, strength: float = 1.0) -> Plan:
    """Timesteps and sigmas of `steps` steps of `sampler`, as the matching diffusers scheduler sets them.
    strength < 1 (img2img) keeps the last min(int(steps * strength), steps) steps; 0 keeps none."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    schedule = schedule if schedule is not None else Schedule.sd15()
    N = schedule.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= N:
        raise ValueError(f"steps must be an integer in [1, {N}], got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    train = schedule.sigmas()
    kind, karras = sampler.removesuffix("_karras"), sampler.endswith("_karras")
    zero = torch.zeros(1, dtype=torch.float64)

    if kind in ("ddim", "ddpm"):  # DDIMScheduler, DDPMScheduler: integer timesteps, VP latents
        t = _timesteps(schedule.timestep_spacing or "leading", steps, schedule)[:steps]
        sig = _interp(train, t)
        if kind == "ddim":  # lands at t - N // steps; below 0 at a = alphas_cumprod[0], or 1
            prev = t - N // steps
            final = zero if schedule.set_alpha_to_one else train[:1].double()
            to = torch.where(prev >= 0, _interp(train, prev), final)
            sigmas = torch.cat([sig, to[-1:]])
        else:               # lands on the next timestep, and on a = 1 (sigma 0) after the last
            sigmas = torch.cat([sig, zero])
            to = sigmas[1:]
        init = None  # VP: diffusers starts from unit noise
    elif kind in ("euler", "euler_a"):  # Euler(Ancestral)DiscreteScheduler: sigma-space latents
        spacing = schedule.timestep_spacing or "linspace"
        t = _timesteps(spacing, steps, schedule, rounded=False).float().double()
        sig = _interp(train, t)  # (t = -1 of "trailing"'s extra point reads sigma at t = 0)
        if karras:  # EulerDiscreteScheduler(use_karras_sigmas=True): between the spaced sigmas' ends
            sig = karras_sigmas(sig[-1].item(), sig[0].item(), steps)
            t = _sigma_to_t(sig, train)
        t, sig = t[:steps], sig[:steps]
        sigmas = torch.cat([sig, zero])
        to = sigmas[1:]
        s_max = sigmas.float().max()
        init = (s_max if spacing in ("linspace", "trailing") else (s_max ** 2 + 1) ** 0.5).item()
    else:  # DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2): VP latents
        spacing = schedule.timestep_spacing or "linspace"
        if spacing == "leading" and steps + 1 > N and not karras:  # diffusers: all t equal, NaNs
            raise ValueError(f"{sampler} with leading timestep spacing needs steps < {N}, got {steps}")
        t = _timesteps(spacing, steps, schedule, extra=1)[:steps]
        if karras:  # over the whole training range, timesteps rounded
            sig = karras_sigmas(train[0].item(), train[-1].item(), steps)
            t = _sigma_to_t(sig, train).round()
        else:
            sig = _interp(train, t)
        sigmas = torch.cat([sig, zero])
        to = sigmas[1:]
        init = None

    timesteps, sigmas, to = t.float(), sigmas.float(), to.float()
    if init is None:  # VP latent = unit noise  =>  x = noise * sqrt(1 + sigma_0^2)
        init = ((sigmas[0] ** 2 + 1) ** 0.5).item()
    first = steps - min(int(steps * strength), steps)  # diffusers' img2img truncation
    if first == steps:  # strength 0: nothing to do, the input comes back unchanged
        return Plan(sampler, timesteps[:0], torch.zeros(1), to[:0], init)
    return Plan(sampler, timesteps[first:], sigmas[first:], to[first:], init)


def start(plan: Plan, noise: torch.Tensor) -> torch.Tensor:
    """txt2img: the starting state from unit noise, diffusers' `latents * init_noise_sigma` in sigma space."""
    return noise * plan.init_noise_sigma


def add_noise(plan: Plan, x0: torch.Tensor, noise: torch.Tensor, step: int = 0) -> torch.Tensor:
    """x0 noised to the level before `step` (img2img: step 0; inpaint: any step), x0 + sigma * noise.
    The same as diffusers' scheduler.add_noise at that step's timestep."""
    return x0 + plan.sigmas[step].item() * noise


def finish(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """The final state in diffusers' latent convention: x itself when the last sigma is 0; DDIM with
    set_alpha_to_one=False ends at a = alphas_cumprod[0] and keeps its VP latent x / sqrt(sigma^2 + 1)."""
    s = plan.sigmas[-1].item()
    return x if s == 0 else x / (s ** 2 + 1) ** 0.5


# -----------------------------------------------------------------------------
# samplers: denoise(x, i) -> x0_hat at step i, which takes x from sigmas[i] to sigmas[i+1]; after it
# callback(i + 1, n), and, if another step follows, x = between_steps(x, i + 1)

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


def _step_done(x, i, n, between_steps, callback):
    """End of step i: report progress, then let the caller edit the state before step i+1 (inpainting)."""
    if callback is not None:
        callback(i + 1, n)
    if between_steps is not None and i + 1 < n:
        x = between_steps(x, i + 1)
    return x


def ancestral_step(sigma, sigma_next, eta=1.0):
    """Split a step sigma -> sigma_next into a deterministic move down to sigma_down and fresh noise
    sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 gives the DDPM posterior's variance
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2; eta = 0 gives no noise."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma ** 2 - sigma_next ** 2) / sigma)
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def sample_euler(denoise: Denoiser, x, sigmas, *, between_steps=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0_hat(x, sigma)) / sigma."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, i)
        d = (x - x0) / sigma  # = eps_hat
        x = x + d * (sigma_next - sigma)
        x = _step_done(x, i, n, between_steps, callback)
    return x


def sample_euler_ancestral(denoise: Denoiser, x, sigmas, *, noise, eta=1.0, between_steps=None,
                           callback=None):
    """Ancestral sampling: an Euler step down to sigma_down, then fresh noise up to sigma_next."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, i)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - x0) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise() * sigma_up
        x = _step_done(x, i, n, between_steps, callback)
    return x


def sample_ddpm(denoise: Denoiser, x, sigmas, *, noise, between_steps=None, callback=None):
    """DDPM ancestral sampling: x_next ~ q(x_next | x, x0_hat), the forward process's posterior.
    In VP form mean = sqrt(a') b / (1-a) x0 + sqrt(a/a') (1-a') / (1-a) x_t, var = (1-a')/(1-a) b,
    with b = 1 - a/a'. In sigma space (divide by sqrt(a'), a = 1/(1+sigma^2)) and r = sigma_next^2/sigma^2:
        mean = x0 + r (x - x0),   std = sigma_next sqrt(1 - r)
    (the same step as Euler ancestral with eta = 1)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, i)
        r = (sigma_next / sigma) ** 2
        x = x0 + r * (x - x0)
        if sigma_next > 0:
            x = x + noise() * (sigma_next * math.sqrt(1 - r))
        x = _step_done(x, i, n, between_steps, callback)
    return x


def sample_ddim(denoise: Denoiser, x, sigmas, *, eta=0.0, noise=None, sigmas_to=None, between_steps=None,
                callback=None):
    """DDIM (Song et al. 2020). In VP form, from a to a' with eps_hat = (x - x0_hat) / sigma:
        x' = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z,  std^2 = eta^2 (1-a')/(1-a) (1 - a/a')
    Divided by sqrt(a') this is x' = x0 + sigma_down eps + sigma_up z with ancestral_step's split:
    eta = 0 is an Euler step, eta = 1 the DDPM posterior.
    sigmas_to[i] (default sigmas[i+1]) is where step i lands. diffusers' DDIM always lands at
    t - N // steps, which with "linspace"/"trailing" spacing is not the next timestep: the next step
    reads the same VP latent x / sqrt(sigma^2 + 1) at the next timestep's sigma, so x is rescaled."""
    n = len(sigmas) - 1
    sigmas_to = sigmas[1:] if sigmas_to is None else sigmas_to
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs noise")
    for i in range(n):
        sigma, sigma_to, sigma_next = sigmas[i].item(), sigmas_to[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, i)
        eps = (x - x0) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta)
        x = x0 + sigma_down * eps
        if sigma_up > 0:
            x = x + noise() * sigma_up
        if sigma_next != sigma_to:
            x = x * math.sqrt((sigma_next ** 2 + 1) / (sigma_to ** 2 + 1))
        x = _step_done(x, i, n, between_steps, callback)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x, sigmas, *, between_steps=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
    algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True.
    With lambda = -log(sigma) and h = lambda_next - lambda (so e^-h = sigma_next / sigma):
        first order (= DDIM):  x' = (sigma_next / sigma) x + (1 - e^-h) x0_hat
        second order:          the same with x0_hat -> x0_hat + (x0_hat - x0_hat_prev) / (2 r),
                               r = h_prev / h
    The first step (no history) and the last (sigma_next = 0: lands on x0_hat) are first order."""
    n = len(sigmas) - 1
    x0_prev, h_prev = None, None
    for i in range(n):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x0 = denoise(x, i)
        if sigma_next == 0:
            x, h = x0, None
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * d
        x0_prev, h_prev = x0, h
        x = _step_done(x, i, n, between_steps, callback)
    return x


def run(sampler: str, denoise: Denoiser, x: torch.Tensor, plan: Plan, *, noise, eta: float = 0.0,
        between_steps=None, callback=None) -> torch.Tensor:
    """Run `plan` with `sampler` from state x. noise() -> fresh unit noise shaped like x (ancestral
    samplers, DDIM with eta > 0); eta is DDIM's. After step i (0-based) callback(i + 1, plan.steps)
    may raise to cancel; before step i >= 1, x = between_steps(x, i) if given (inpainting)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if plan.sampler != sampler:
        raise ValueError(f"plan was made for sampler {plan.sampler!r}, not {sampler!r}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise ValueError(f"eta must be >= 0 and only applies to ddim, got eta={eta} for {sampler!r}")
    kind = sampler.removesuffix("_karras")
    if kind in ("euler_a", "ddpm") and noise is None:
        raise ValueError(f"sampler {sampler!r} needs noise")
    if kind == "ddim":
        return sample_ddim(denoise, x, plan.sigmas, eta=eta, noise=noise, sigmas_to=plan.sigmas_to,
                           between_steps=between_steps, callback=callback)
    if kind == "ddpm":
        return sample_ddpm(denoise, x, plan.sigmas, noise=noise, between_steps=between_steps, callback=callback)
    if kind == "euler":
        return sample_euler(denoise, x, plan.sigmas, between_steps=between_steps, callback=callback)
    if kind == "euler_a":
        return sample_euler_ancestral(denoise, x, plan.sigmas, noise=noise, between_steps=between_steps,
                                      callback=callback)
    return sample_dpmpp_2m(denoise, x, plan.sigmas, between_steps=between_steps, callback=callback)
