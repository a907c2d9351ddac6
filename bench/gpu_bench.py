"""GPU txt2img at the SD 1.5 architecture (random weights, the same in both), here vs diffusers'
StableDiffusionPipeline: fp16, 512x512, 30 ddim steps, guidance 7.5, batch 1 and 8 (num_images), eager and
with torch.compile. Prints one table. Run through bench/gpu.sh (it checks the GPU and the packages first).

    python bench/gpu_bench.py [--budget-s 500] [--steps 30] [--size 512] [--repeats 3]

Every configuration times the two sides interleaved (diffusers, ours, diffusers, ours, ...) after one warm-up
each (which is also where torch.compile compiles). Configurations run in order of importance and the script
stops starting new ones when --budget-s would be exceeded, printing the table of what it measured.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPT = "a photograph of an astronaut riding a horse on the moon"


def load_both(folder, dtype, device):
    import diffusers

    from model import StableDiffusion

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusion.from_pretrained(folder, device=device, dtype=dtype)
    return ref, ours


def runners(ref, ours, batch, steps, size):
    def diffusers_run():
        return ref(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                   num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(42)).images

    def ours_run():
        return ours.txt2img(PROMPT, steps=steps, guidance_scale=7.5, sampler="ddim", seed=42, width=size,
                            height=size, num_images=batch)

    return {"diffusers": diffusers_run, "ours": ours_run}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def measure(fns, repeats):
    """Warm-up (compilation) then interleaved timed runs: ({name: median s}, {name: warm-up s}, max pixel diff)."""
    warm, images = {}, {}
    for name, fn in fns.items():
        warm[name], images[name] = timed(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
               for a, b in zip(images["diffusers"], images["ours"]))
    return {n: statistics.median(v) for n, v in times.items()}, warm, diff


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=500, help="start no configuration after this many seconds")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script (with a small --size)")
    ap.add_argument("--no-compile", action="store_true", help="eager configurations only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {name}, {dtype}, {args.size}x{args.size}, "
          f"{args.steps} ddim steps, guidance 7.5", flush=True)

    from txt2img_vs_diffusers import save_reference

    rows = []
    with tempfile.TemporaryDirectory(prefix="sd15_gpu_") as tmp:
        folder = save_reference(Path(tmp))
        ref, ours = load_both(folder, dtype, args.device)
    print(f"built, saved and loaded both pipelines in {time.perf_counter() - t0:.0f} s", flush=True)

    # (label, batch, what to do before): eager first, then compiled (compilation is the slow part)
    def compile_both():   # the UNets, as diffusers' own docs do (its VAE and text encoder stay eager, as ours)
        ref.unet.compile()
        ours.optimize(compile=True)

    def channels_last_both():   # diffusers' advice with torch.compile; a layout change makes both recompile
        ref.unet.to(memory_format=torch.channels_last)
        ours.optimize(channels_last=True)

    # (label, batch, what to do first, a generous estimate of its seconds on an H100/H200 including compilation)
    configs = [("eager", 1, None, 20), ("eager", 8, None, 100),
               ("both UNets compiled", 1, compile_both, 200), ("both UNets compiled", 8, None, 200),
               ("compiled + channels_last", 1, channels_last_both, 200), ("compiled + channels_last", 8, None, 200)]
    if args.no_compile:
        configs = configs[:2]
    skipping = False
    for label, batch, before, estimate in configs:
        # a config that would end past the budget is skipped, and so is every later one (they build on it)
        skipping = skipping or time.perf_counter() - t0 + estimate > args.budget_s
        if skipping:
            print(f"skipped (time budget {args.budget_s:.0f} s): {label}, batch {batch}", flush=True)
            continue
        if before is not None:
            before()
        repeats = args.repeats if batch == 1 else max(1, args.repeats - 1)
        med, warm, diff = measure(runners(ref, ours, batch, args.steps, args.size), repeats)
        row = (label, batch, med["diffusers"], med["ours"], warm["diffusers"], warm["ours"], diff)
        rows.append(row)
        print(f"  {label}, batch {batch}: diffusers {med['diffusers']:.3f} s, ours {med['ours']:.3f} s, "
              f"ratio {med['ours'] / med['diffusers']:.3f}, max pixel diff {diff}/255 "
              f"(warm-up {warm['diffusers']:.0f} s / {warm['ours']:.0f} s) at {time.perf_counter() - t0:.0f} s",
              flush=True)

    print("\n| configuration | batch | diffusers s | ours s | time ratio ours/diffusers | diffusers img/s | "
          "ours img/s | img/s ratio | max pixel diff | warm-up s (diffusers / ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, batch, d, o, wd, wo, diff in rows:
        print(f"| {label} | {batch} | {d:.3f} | {o:.3f} | {o / d:.3f} | {batch / d:.2f} | {batch / o:.2f} | "
              f"{d / o:.3f} | {diff}/255 | {wd:.0f} / {wo:.0f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; targets: faster than diffusers at batch 1 (time ratio < 1), "
          f"images/s at batch 8 >= 1.2x diffusers' (img/s ratio >= 1.2)")


if __name__ == "__main__":
    main()
