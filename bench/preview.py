"""
What live previews cost (model/preview.py): the linear latent -> RGB map plus the PNG encode of the preview, per
step, against the UNet step it rides on (target: under 5% of the step time when someone watches; nothing when
nobody does). Each pair is timed side by side in one run, interleaved (step, preview, step, preview, ...), medians:

  default   the default model in weights/ (optimize()d, as served), one guided image at its native size: one UNet
            call of batch 2 vs one preview (map + PNG) at latent resolution and at the image's size; the ratio
            per step and with a preview every 4th step. Then whole generations (20 euler steps) without
            on_latents and with a preview every 4th step, interleaved: what watching really adds.
  sd15      the SD 1.5 UNet layout (859.5M parameters, random weights, bench/unet_step.py's build_pair / inputs),
            batch 2 at 64x64 latents (512x512 px), vs a preview of 64x64 latents from the map of a random SD 1.5
            VAE, at 64x64 and resized to 512x512.
  fit       LatentPreview.fit at load: the default model's VAE and an SD 1.5 VAE (random weights), first call and
            median of the next ones.

    .venv/bin/python bench/preview.py [--repeats 5] [--skip sd15]
"""

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from model import Request, StableDiffusion
from model.preview import LatentPreview
from model.tuning import cpu_model
from model.vae import AutoencoderKL, VAEConfig

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: median seconds}, each fn once per round, in turn, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(v) for name, v in times.items()}


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def report(label: str, med: dict, step: str, previews: list) -> None:
    print(f"  {label}: UNet step {med[step] * 1000:.1f} ms")
    for name in previews:
        r = med[name] / med[step]
        print(f"    preview {name}: {med[name] * 1000:.2f} ms = {r:.2%} of a step; every 4th step {r / 4:.2%} "
              f"(target < 5%: {'met' if r / 4 < 0.05 else 'NOT met'} every 4th, {'met' if r < 0.05 else 'not met'} "
              f"every step)")


def bench_fit(vae, label: str, repeats: int) -> None:
    with torch.inference_mode():
        first = timed(lambda: LatentPreview.fit(vae))
        rest = statistics.median(timed(lambda: LatentPreview.fit(vae)) for _ in range(repeats))
    print(f"  fit, {label}: first call {first * 1000:.0f} ms, then {rest * 1000:.0f} ms (median of {repeats})")


def bench_default(repeats: int) -> None:
    pipe = StableDiffusion.from_pretrained(ROOT / "weights").optimize()
    pipe.warm_up()
    size, f = pipe.native_size, pipe.latent_factor
    print(f"default model ({size}x{size} px, latents {size // f}x{size // f}, factor {f}):")
    bench_fit(pipe.vae, "default model's VAE", repeats)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.unet.config.in_channels, size // f, size // f, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.full((2,), 500)
    x0 = x[:1, :4]

    def step():
        with torch.inference_mode():
            pipe.unet(x, t, ctx)

    fns = {"step": step,
           "latent-size": lambda: png(pipe.preview_images(x0)[0]),
           f"{size}x{size}": lambda: png(pipe.preview_images(x0, size=(size, size))[0])}
    report("one guided image (UNet batch 2)", interleaved(fns, repeats * 4), "step", list(fns)[1:])

    steps, requests = 20, [Request("a red circle on a blue background", seed=1)]

    def plain():
        pipe.generate(requests, steps=steps, sampler="euler")

    def watched():
        def on_latents(step, total, x0):
            if step % 4 == 0 or step == total:
                png(pipe.preview_images(x0, size=(size, size))[0])
        pipe.generate(requests, steps=steps, sampler="euler", on_latents=on_latents)

    med = interleaved({"plain": plain, "watched": watched}, repeats)
    print(f"  {steps}-step generation: without on_latents {med['plain'] * 1000:.0f} ms, previews every 4th step "
          f"(and the last) {med['watched'] * 1000:.0f} ms: {med['watched'] / med['plain'] - 1:+.2%} (noise of a "
          f"shared machine included)")


def bench_sd15(repeats: int) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from unet_step import build_pair, inputs

    print("SD 1.5 layout (random weights), latents 64x64 (512x512 px):")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.sd15()).eval()
    bench_fit(vae, "SD 1.5 VAE (random weights)", max(1, repeats // 2))
    with torch.inference_mode():
        preview = LatentPreview.fit(vae)
    del vae
    _, unet = build_pair(want_ref=False, prepack="auto")
    x, t, ctx = inputs(64)
    x0 = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))

    def step():
        with torch.inference_mode():
            unet(x, t, ctx)

    fns = {"step": step,
           "64x64 (latent size)": lambda: png(preview.to_images(x0)[0]),
           "512x512": lambda: png(preview.to_images(x0, size=(512, 512))[0])}
    report("one guided image (UNet batch 2)", interleaved(fns, repeats), "step", list(fns)[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", choices=["default", "sd15"])
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {load[0]:.2f}")
    if args.skip != "default":
        bench_default(args.repeats)
    if args.skip != "sd15":
        bench_sd15(args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
