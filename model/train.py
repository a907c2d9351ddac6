"""
Training a small Stable Diffusion 1.x model from scratch: `sd train --config configs/tiny.yaml`.

    0. tokenizer   a CLIP BPE vocabulary learnt from the captions (tokenizer.train_bpe)
    1. VAE         reconstruction (L1 + L2) + a small KL term; then scaling_factor = 1 / std(latents), frozen
    2. diffusion   text encoder and UNet together on SD 1.x's epsilon-prediction loss:
                       x_t = sqrt(a_t) z + sqrt(1 - a_t) eps,   t ~ uniform{0..999},   loss = |eps - unet(x_t, t, text)|^2
                   with the caption dropped (-> "") with probability p, so that classifier-free guidance
                   works; AdamW, linear warm-up then cosine decay, gradient clipping, and an EMA copy of both
                   networks, which is what gets saved and sampled from.

The output folder:

    config.yaml       the config this run was started with
    tokenizer/        vocab.json + merges.txt
    weights/          the latest native weights (EMA), written at every diffusion checkpoint; the model
    checkpoint.pt     everything needed to --resume: raw and EMA weights, optimizer, step, RNG state
                      (plain tensors and dicts: torch.load(weights_only=True) reads it)
    log.jsonl         one line per step {"phase", "step", "loss", "lr", "time"}, and eval lines
    samples/          vae_<step>.png (inputs over reconstructions), diffusion_<step>.png (a grid of the eval
                      prompts in prompts.txt, EMA weights, 20 DDIM steps, guidance 7.5)

Every random draw of training (batches, noise, timesteps, caption dropout, posterior samples) comes from
one torch.Generator whose state is checkpointed, and the data is a pure function of the config, so a
resumed run takes exactly the steps the uninterrupted run would have taken (on the same machine and
thread count).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .clip import CLIPTextConfig, CLIPTextModel
from .data import ImageFolderDataset, ShapesDataset, all_captions
from .pipeline import StableDiffusion, to_pil
from .samplers import Schedule
from .shapes_eval import eval_prompts, generate, score_split
from .tokenizer import CLIPTokenizer, train_bpe
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import SD1_SCHEDULER_CONFIG, Components, load, save_native

# -----------------------------------------------------------------------------
# config: YAML -> dataclasses; unknown keys are errors


class ConfigError(ValueError):
    """A training config that cannot be used: unknown keys, wrong types, inconsistent sizes."""


def _check_positive(obj, where, *names):
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(obj, name)}")


@dataclass
class ShapesData:
    length: int = 20000         # number of (image, caption) samples; sample i depends only on (seed, i)
    seed: int = 0


@dataclass
class ImageFolderData:
    root: str                   # images + metadata.jsonl or same-named .txt captions (see data.ImageFolderDataset)


@dataclass
class DataConfig:
    shapes: Optional[ShapesData] = None
    image_folder: Optional[ImageFolderData] = None

    def __post_init__(self):
        if (self.shapes is None) == (self.image_folder is None):
            raise ConfigError("data: give exactly one of 'shapes' or 'image_folder'")


@dataclass
class TokenizerConfig:
    vocab_size: int = 1024      # at most; BPE stops early when every word is one token


@dataclass
class VAETraining:
    steps: int = 1000
    batch_size: int = 32
    crop_size: Optional[int] = None  # train on random crops this big (the VAE is convolutional; half size: ~4x faster)
    lr: float = 1e-3
    warmup_steps: int = 50
    final_lr: float = 0.1       # cosine decay from lr to final_lr * lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l2_weight: float = 1.0      # reconstruction = L1 + l2_weight * L2 (per pixel means)
    kl_weight: float = 1e-4     # times the KL per latent element

    def __post_init__(self):
        _check_positive(self, "vae_training", "batch_size")


@dataclass
class DiffusionTraining:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 100
    final_lr: float = 0.1       # cosine decay from lr to final_lr * lr
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # probability of training on the empty caption (classifier-free guidance)
    ema_decay: float = 0.999
    snr_gamma: Optional[float] = None  # Min-SNR-gamma loss weights (Hang et al. 2023); None = plain MSE

    def __post_init__(self):
        _check_positive(self, "diffusion_training", "batch_size")


# model sizes are the model configs' own fields, less the ones training decides
_MODEL_SECTIONS = {
    "text_encoder": (CLIPTextConfig, {"vocab_size": "the tokenizer's vocabulary"}),
    "vae": (VAEConfig, {"sample_size": "image_size", "scaling_factor": "measured after the VAE phase"}),
    "unet": (UNetConfig, {"in_channels": "vae.latent_channels", "out_channels": "vae.latent_channels",
                          "cross_attention_dim": "text_encoder.hidden_size",
                          "sample_size": "image_size / the VAE's downsample factor"}),
}


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    seed: int = 0
    image_size: int = 64
    data: DataConfig = field(default_factory=lambda: DataConfig(shapes=ShapesData()))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_encoder: dict = field(default_factory=dict)   # CLIPTextConfig fields
    vae: dict = field(default_factory=dict)            # VAEConfig fields
    unet: dict = field(default_factory=dict)           # UNetConfig fields
    vae_training: VAETraining = field(default_factory=VAETraining)
    diffusion_training: DiffusionTraining = field(default_factory=DiffusionTraining)
    checkpoint_every: int = 500  # steps, in each phase; also at the end of each phase
    sample_prompts: int = 24     # eval prompts in each diffusion checkpoint's sample grid (0: none)
    num_threads: Optional[int] = None  # torch threads; None = every core this process may use
    init_from: Optional[str] = None    # fine-tune these weights (any layout model.weights.load reads); their
    # tokenizer and sizes are used (tokenizer/text_encoder/vae/unet above are then ignored); vae_training.steps: 0
    # keeps their VAE and its scaling_factor

    def __post_init__(self):
        _check_positive(self, "config", "checkpoint_every", "image_size")
        for name, (cls, derived) in _MODEL_SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, dict):
                raise ConfigError(f"{name}: expected a mapping of {cls.__name__} fields")
            allowed = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
            for key in section:
                if key in derived:
                    raise ConfigError(f"{name}.{key} is set by training (from {derived[key]}); remove it")
                if key not in allowed:
                    raise ConfigError(f"{name}: unknown key {key!r} (expected one of: {', '.join(allowed)})")

    def to_dict(self):
        return dataclasses.asdict(self)


def _check_type(value, tp, where):
    """value as type tp (ints are fine for floats, '1e-4' strings too: YAML 1.1 reads those as strings)."""
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, d, where="config"):
    """Build dataclass cls from a dict, recursively; unknown keys and wrong types raise ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected one of: {', '.join(names)})")
    kwargs = {}
    for key, value in d.items():
        tp, here = hints[key], f"{where}.{key}" if where != "config" else key
        args = typing.get_args(tp)
        if type(None) in args:                              # Optional[X]
            if value is None:
                kwargs[key] = None
                continue
            tp = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, here)
        else:
            kwargs[key] = _check_type(value, tp, here)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config(path) -> TrainConfig:
    """A TrainConfig from a YAML file."""
    import yaml

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from e
    try:
        return from_dict(TrainConfig, d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

# -----------------------------------------------------------------------------
# data: every image and caption in memory (the default data set is ~250 MB of uint8 at 64x64)


def load_data(cfg: TrainConfig):
    """(images uint8 [N, 3, H, W], captions [N])."""
    if cfg.data.shapes is not None:
        ds = ShapesDataset(cfg.data.shapes.length, seed=cfg.data.shapes.seed, image_size=cfg.image_size)
    else:
        ds = ImageFolderDataset(cfg.data.image_folder.root, image_size=cfg.image_size)
    images = torch.empty(len(ds), 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    captions = []
    for i in range(len(ds)):
        x, caption = ds[i]
        images[i] = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        captions.append(caption)
    return images, captions


def to_float(images):
    """uint8 [B, 3, H, W] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def make_tokenizer(cfg: TrainConfig, captions) -> CLIPTokenizer:
    """BPE over every caption the data set can produce (shapes) or over the folder's captions."""
    corpus = list(all_captions()) if cfg.data.shapes is not None else list(captions)
    vocab, merges = train_bpe(corpus, cfg.tokenizer.vocab_size)
    return CLIPTokenizer(vocab, merges)

# -----------------------------------------------------------------------------
# models


def build_models(cfg: TrainConfig, tokenizer: CLIPTokenizer):
    """(text_encoder, vae, unet), freshly initialised from cfg.seed, sizes from the config."""
    text_cfg = CLIPTextConfig(**{**cfg.text_encoder, "vocab_size": len(tokenizer)})
    vae_cfg = VAEConfig(**{**cfg.vae, "sample_size": cfg.image_size})
    f = vae_cfg.downsample_factor
    if cfg.image_size % f:
        raise ConfigError(f"image_size {cfg.image_size} is not a multiple of the VAE's downsample factor {f}")
    crop = cfg.vae_training.crop_size
    if crop is not None and not (crop <= cfg.image_size and crop % f == 0):
        raise ConfigError(f"vae_training.crop_size {crop} must be a multiple of {f} and at most image_size")
    if text_cfg.max_position_embeddings < tokenizer.model_max_length:
        raise ConfigError(f"text_encoder.max_position_embeddings must be >= {tokenizer.model_max_length}")
    unet_cfg = UNetConfig(**{**cfg.unet, "in_channels": vae_cfg.latent_channels,
                             "out_channels": vae_cfg.latent_channels, "cross_attention_dim": text_cfg.hidden_size,
                             "sample_size": cfg.image_size // f})
    torch.manual_seed(cfg.seed)
    text_encoder, vae, unet = CLIPTextModel(text_cfg), AutoencoderKL(vae_cfg), UNet(unet_cfg)
    with torch.no_grad():   # a narrow posterior from the start (std e^-3), so that latents carry the image at once
        vae.quant_conv.bias[vae_cfg.latent_channels:] = -6.0
    return text_encoder, vae, unet


def n_params(model):
    return sum(p.numel() for p in model.parameters())

# -----------------------------------------------------------------------------
# small pieces of the loops


def lr_at(step, steps, lr, warmup, final=1.0):
    """Linear warm-up over `warmup` steps, then cosine from lr down to final * lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def ema_update(ema_model, model, decay):
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def ema_decay_at(step, decay):
    """The EMA decay of step `step` (0-based): ramps up (1 + s) / (10 + s) at first, as diffusers' EMAModel."""
    return min(decay, (1 + step) / (10 + step))


class Progress:
    """A one-line progress report on stderr: phase, step, smoothed loss, it/s, time left."""

    def __init__(self, name, total, start):
        self.name, self.total, self.start_step = name, total, start
        self.t0, self.loss, self.tty = time.perf_counter(), None, sys.stderr.isatty()

    def update(self, step, loss):   # step: steps done
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        rate = (step - self.start_step) / max(time.perf_counter() - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else 0
        line = (f"{self.name} {step}/{self.total}  loss {self.loss:.4f}  {rate:.2f} it/s  "
                f"{int(left // 60)}:{int(left % 60):02d} left")
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step == self.total or step % 25 == 0:
            print(line, file=sys.stderr, flush=True)


class Log:
    """log.jsonl, kept consistent with checkpoints: on resume, lines past the checkpoint are dropped."""

    PHASES = ("vae", "diffusion")

    def __init__(self, path, resume_at=None):
        self.path = Path(path)
        if resume_at is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line and self._position(json.loads(line)) <= resume_at]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_at is None:
            self.path.write_text("")
        self.t0 = time.perf_counter()

    def _position(self, entry):
        return (self.PHASES.index(entry["phase"]), entry["step"])

    def write(self, **entry):
        entry.setdefault("time", round(time.perf_counter() - self.t0, 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def read(self):
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

# -----------------------------------------------------------------------------
# checkpoints


def _replace_dir(tmp, final):
    """Move folder tmp to final, replacing what was there (old copy removed only once the new one is in place)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out, state):
    """out/checkpoint.pt, written to a temporary file first so that a kill mid-save keeps the last one."""
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "checkpoint.pt")


def load_checkpoint(out):
    path = out / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(out, components):
    """out/weights/: native weights, replaced as a whole."""
    tmp = out / "weights.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_native(components, tmp)
    _replace_dir(tmp, out / "weights")

# -----------------------------------------------------------------------------
# sample grids


def image_grid(images, cols):
    """PIL images of one size -> one PIL image, `cols` per row."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (128, 128, 128))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def sample_specs(n):
    """n of the shapes eval prompts, spread over every (colour, shape) pair (held-out pairs included)."""
    specs = eval_prompts(variants=max(1, -(-n // 24)))
    step = len(specs) / n
    return [specs[int(i * step)] for i in range(n)]


def sample_and_score(components, specs, steps=20, guidance_scale=7.5):
    """One image per spec (seed = its index) through the pipeline, and the shapes classifier's accuracy on
    them, for seen and held-out (colour, shape) pairs."""
    pipe = StableDiffusion(components, name="training")
    images = generate(pipe, specs, guidance_scale=guidance_scale, steps=steps, batch_size=len(specs))
    result = {name: {k: round(v, 3) for k, v in scores.items()} for name, scores in score_split(images, specs).items()}
    return images, result

# -----------------------------------------------------------------------------
# phase 1: the VAE


def vae_loss(vae, x, cfg: VAETraining, generator):
    posterior = vae.encode(x)
    z = posterior.sample(generator=generator)
    x_hat = vae.decode(z)
    l1, l2 = (x_hat - x).abs().mean(), (x_hat - x).pow(2).mean()
    kl = posterior.kl().mean() / z[0].numel()              # per latent element
    return l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl


@torch.no_grad()
def encode_all(vae, images, batch_size=64):
    """Posterior mean and std of every image: ([N, C, h, w], [N, C, h, w])."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(to_float(images[i:i + batch_size]))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean, std, seed):
    """1 / std of posterior samples (SD 1.x measured 0.18215 this way), over at most 1024 images."""
    g = torch.Generator().manual_seed(seed)
    mean, std = mean[:1024], std[:1024]
    z = mean + std * torch.randn(mean.shape, generator=g)
    return 1.0 / z.float().std().item()

# -----------------------------------------------------------------------------
# phase 2: text encoder + UNet


def diffusion_loss(text_encoder, unet, ids, z, alphas_cumprod, generator, snr_gamma=None):
    """SD 1.x's epsilon-prediction loss on clean scaled latents z [B, C, h, w] and token ids [B, T]."""
    B = z.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)
    noise = torch.randn(z.shape, generator=generator)
    a = alphas_cumprod[t].view(B, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    eps = unet(x_t, t, text_encoder(ids))
    loss = (eps - noise).pow(2).mean(dim=(1, 2, 3))       # [B]
    if snr_gamma is not None:                             # Min-SNR: weight min(SNR, gamma) / SNR
        snr = (a / (1 - a)).flatten()
        loss = loss * snr.clamp(max=snr_gamma) / snr
    return loss.mean()

# -----------------------------------------------------------------------------
# the whole run


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def train(cfg: TrainConfig, out_dir=None, resume=False, stop_after=None, quiet=False, progress=None):
    """
    Run (or, with resume, continue) the training described by cfg; returns the output folder.
    stop_after: stop once this many steps (VAE + diffusion) are done, after writing a checkpoint there
    (a time-boxed run; --resume continues it).
    progress: makes each phase's progress report, progress(name, total, start) with .update(step, loss)
    (default: Progress; `sd train` passes a tqdm bar on a terminal).
    """
    progress = progress or Progress
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads or _cores())
    tty = sys.stderr.isatty()

    def say(message):   # on a terminal, over the progress line (redrawn at the next step)
        if not quiet:
            print(("\r\033[K" if tty else "") + message, file=sys.stderr, flush=True)

    vt, dt = cfg.vae_training, cfg.diffusion_training

    state = load_checkpoint(out) if resume else None
    if state is not None:
        say(f"resuming from {out / 'checkpoint.pt'}: {state['phase']} step {state['step']}")
        if state["config"] != cfg.to_dict():
            say("warning: the config differs from the checkpoint's; continuing with the new one")
    else:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    t0 = time.perf_counter()
    images, captions = load_data(cfg)
    say(f"data: {len(images)} images {cfg.image_size}x{cfg.image_size} ({time.perf_counter() - t0:.1f} s)")

    # tokenizer and models: from init_from, from the checkpoint's run, or new
    if cfg.init_from:
        c = load(cfg.init_from)
        tokenizer, text_encoder, vae, unet = c.tokenizer, c.text_encoder, c.vae, c.unet
        vae.config.sample_size = cfg.image_size
    else:
        tokenizer = (CLIPTokenizer.from_dir(out / "tokenizer") if state is not None
                     else make_tokenizer(cfg, captions))
        text_encoder, vae, unet = build_models(cfg, tokenizer)
    tokenizer.save(out / "tokenizer")
    if state is not None:
        vae.load_state_dict(state["vae"])
        vae.config.scaling_factor = state["scaling_factor"]
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
    say(f"models: text encoder {n_params(text_encoder) / 1e6:.2f}M, VAE {n_params(vae) / 1e6:.2f}M, "
        f"UNet {n_params(unet) / 1e6:.2f}M parameters; vocabulary {len(tokenizer)}; "
        f"latents {vae.config.latent_channels}x{unet.config.sample_size}x{unet.config.sample_size}")

    generator = torch.Generator().manual_seed(cfg.seed)
    if state is not None:
        generator.set_state(state["generator"])
    phase = state["phase"] if state is not None else ("vae" if vt.steps > 0 else "diffusion")
    step = state["step"] if state is not None else 0
    log = Log(out / "log.jsonl", resume_at=(Log.PHASES.index(phase), step) if state is not None else None)
    (out / "samples").mkdir(exist_ok=True)

    def base_state(phase, step):
        return {"phase": phase, "step": step, "config": cfg.to_dict(), "generator": generator.get_state(),
                "scaling_factor": float(vae.config.scaling_factor), "vae": vae.state_dict(),
                "text_encoder": text_encoder.state_dict(), "unet": unet.state_dict()}

    def steps_done(phase, step):
        return step if phase == "vae" else vt.steps + step

    # ---- phase 1: VAE
    if phase == "vae":
        opt = torch.optim.AdamW(vae.parameters(), lr=vt.lr, weight_decay=vt.weight_decay)
        if state is not None and state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
        vae.train()
        report = progress("vae", vt.steps, step)
        while step < vt.steps:
            lr = lr_at(step, vt.steps, vt.lr, vt.warmup_steps, vt.final_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, len(images), (vt.batch_size,), generator=generator)
            x = images[idx]
            if vt.crop_size:                                # one random window for the whole batch
                top, left = torch.randint(0, cfg.image_size - vt.crop_size + 1, (2,), generator=generator).tolist()
                x = x[:, :, top:top + vt.crop_size, left:left + vt.crop_size]
            loss = vae_loss(vae, to_float(x), vt, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), vt.grad_clip)
            opt.step()
            step += 1
            log.write(phase="vae", step=step, loss=round(loss.item(), 6), lr=lr)
            if not quiet:
                report.update(step, loss.item())
            stop = stop_after is not None and steps_done("vae", step) >= stop_after
            if step == vt.steps or step % cfg.checkpoint_every == 0 or stop:
                vae.eval()
                with torch.no_grad():
                    x = to_float(images[:8])
                    recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
                image_grid([to_pil(v) for v in torch.cat([x, recon])], 8).save(out / "samples" / f"vae_{step:06d}.png")
                vae.train()
                if step == vt.steps:
                    break                                   # the phase-2 checkpoint follows at once
                save_checkpoint(out, {**base_state("vae", step), "optimizer": opt.state_dict()})
                if stop:
                    say(f"stopped after {stop_after} steps; continue with --resume")
                    return out
        vae.eval()
        del opt
        mean, std = encode_all(vae, images)
        vae.config.scaling_factor = latent_scale(mean, std, cfg.seed)
        say(f"VAE done: latent scaling_factor = {vae.config.scaling_factor:.5f}")
        phase, step, state = "diffusion", 0, None
        save_checkpoint(out, base_state("diffusion", 0))
        if stop_after is not None and vt.steps >= stop_after:
            say(f"stopped after {stop_after} steps; continue with --resume")
            return out
    else:
        mean = std = None

    # ---- phase 2: text encoder + UNet on the frozen VAE's latents
    vae.eval().requires_grad_(False)
    if mean is None:
        mean, std = encode_all(vae, images)
    scale = vae.config.scaling_factor
    ids = tokenizer(captions)                                              # [N, 77]
    empty = tokenizer([""])[0]
    alphas_cumprod = Schedule.sd15().alphas_cumprod()
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    if state is not None and state.get("ema_unet") is not None:
        ema_text.load_state_dict(state["ema_text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
    ema_text.requires_grad_(False)
    ema_unet.requires_grad_(False)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=dt.lr, weight_decay=dt.weight_decay)
    if state is not None and state.get("optimizer") is not None:
        opt.load_state_dict(state["optimizer"])
    text_encoder.train()
    unet.train()
    specs = sample_specs(cfg.sample_prompts) if cfg.sample_prompts and cfg.data.shapes is not None else []
    if specs:
        (out / "samples" / "prompts.txt").write_text("".join(s.caption(0) + "\n" for s in specs))

    def ema_components():
        return Components(tokenizer, ema_text, vae, ema_unet, dict(SD1_SCHEDULER_CONFIG))

    report = progress("diffusion", dt.steps, step)
    while step < dt.steps:
        lr = lr_at(step, dt.steps, dt.lr, dt.warmup_steps, dt.final_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (dt.batch_size,), generator=generator)
        m = mean[idx]
        z = (m + std[idx] * torch.randn(m.shape, generator=generator)) * scale     # a posterior sample, scaled
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(dt.batch_size, generator=generator) < dt.caption_dropout] = empty
        loss = diffusion_loss(text_encoder, unet, batch_ids, z, alphas_cumprod, generator, dt.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, dt.grad_clip)
        opt.step()
        decay = ema_decay_at(step, dt.ema_decay)
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        step += 1
        log.write(phase="diffusion", step=step, loss=round(loss.item(), 6), lr=lr)
        if not quiet:
            report.update(step, loss.item())
        stop = stop_after is not None and steps_done("diffusion", step) >= stop_after
        if step == dt.steps or step % cfg.checkpoint_every == 0 or stop:
            save_weights(out, ema_components())
            save_checkpoint(out, {**base_state("diffusion", step), "optimizer": opt.state_dict(),
                                  "ema_text_encoder": ema_text.state_dict(), "ema_unet": ema_unet.state_dict()})
            if specs:
                t1 = time.perf_counter()
                samples, scores = sample_and_score(ema_components(), specs)
                image_grid(samples, 6).save(out / "samples" / f"diffusion_{step:06d}.png")
                log.write(phase="diffusion", step=step, eval=scores)
                say(f"step {step}: eval on {len(specs)} prompts {json.dumps(scores)} "
                    f"({time.perf_counter() - t1:.0f} s)")
            if stop and step < dt.steps:
                say(f"stopped after {stop_after} steps; continue with --resume")
                return out
    say(f"done: weights in {out / 'weights'}")
    return out


def main(argv=None):
    """python -m model.train --config configs/tiny.yaml [--resume] [--out DIR]"""
    import argparse

    p = argparse.ArgumentParser(prog="sd train", description=main.__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    train(load_config(args.config), out_dir=args.out, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
