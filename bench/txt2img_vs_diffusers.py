"""Whole txt2img at the SD 1.5 architecture (random weights: UNet, VAE, CLIP text encoder; the same weights in
both), here vs diffusers' StableDiffusionPipeline: 256x256, 10 ddim steps, guidance 7.5, the same seed.

One random diffusers pipeline is saved to a temporary folder; each side then runs in its own child process
(loading that folder: ours with StableDiffusion.from_pretrained's diffusers-layout loader), so that each one's
peak memory can be read from the kernel (/proc/self/status VmHWM). Children alternate (diffusers, ours,
diffusers, ours, ...) so that load on the machine hits both alike. Prints the median generation time of each
and their ratio (target <= 0.85), the peak RSS of each (whole process, and the generation alone after the
peak is reset) and their ratio (target <= 1.0), and the max pixel difference of the two images (<= 2/255).

    .venv/bin/python bench/txt2img_vs_diffusers.py [--rounds 2] [--size 256] [--steps 10] [--convs auto|prepack|plain]
                                                   [--width 0.5]
                                                   [--reference DIR]
                                                   [--channels-last] [--compile]

Ours runs as pipe.optimize() leaves it (each conv plain or prepacked per shape, as measured here) unless --convs;
--channels-last and
--compile add the other levers. Diffusers runs as it comes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model import sd15
from model.speed import CONVS
from model.tuning import cpu_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = ""
SEED = 42


def save_reference(folder: Path, width: float = 1.0):
    """A random SD 1.5-architecture StableDiffusionPipeline (diffusers' default init) saved as diffusers saves it.
    The tokenizer is the tests' small BPE one (1000 tokens); the text encoder keeps CLIP's 49408-row embedding.
    width scales the UNet's channels (0.5: the half-width layout, 160-320-640-640)."""
    import diffusers
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizer_fixtures import make_tokenizer_dir

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(folder / "tok")))
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**sd15.VAE),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**sd15.TEXT_ENCODER)),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(**dict(
            sd15.UNET, block_out_channels=[int(c * width) for c in sd15.UNET["block_out_channels"]])),
        scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"

# -----------------------------------------------------------------------------
# the child processes


def peak_rss_mb():
    """The process's peak resident set size (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak_rss_mb() covers what follows only."""
    Path("/proc/self/clear_refs").write_text("5")


def child(args):
    side, folder = args.child, Path(args.folder)
    start = time.perf_counter()
    if side == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)

        def generate(steps=args.steps):
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                        height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    else:
        from model import StableDiffusion

        pipe = StableDiffusion.from_pretrained(folder)
        pipe.optimize(prepack=CONVS[args.convs], channels_last=args.channels_last, compile=args.compile)

        def generate(steps=args.steps):
            return pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=7.5,
                                sampler="ddim", seed=SEED, width=args.size, height=args.size)[0]
    load_s = time.perf_counter() - start
    # A warm-up call (one step; with --compile a full one, as compilation happens on the first call of a
    # shape): the first call of a fresh process also pages in memory-mapped weights and creates oneDNN
    # primitives, which a server pays once, not per request. Both sides get it.
    generate(args.steps if args.compile and side == "ours" else 1)
    load_peak = peak_rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    image = generate()
    seconds = time.perf_counter() - start
    np.save(Path(args.out).with_suffix(".npy"), np.asarray(image.convert("RGB")))
    Path(args.out).write_text(json.dumps({"seconds": seconds, "load_s": load_s, "load_peak_mb": load_peak,
                                          "generate_peak_mb": peak_rss_mb()}))

# -----------------------------------------------------------------------------
# the parent


def run_child(side, folder, out, args):
    cmd = [sys.executable, __file__, "--child", side, "--folder", str(folder), "--out", str(out),
           "--size", str(args.size), "--steps", str(args.steps)]
    cmd += ["--convs", args.convs, "--width", str(args.width)]
    cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    result["image"] = np.load(out.with_suffix(".npy")).astype(np.int16)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="diffusers/ours child pairs")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--convs", choices=["auto", "prepack", "plain"], default="auto",
                    help="ours: auto (plain or prepacked per conv shape, as measured; as served), prepack, plain")
    ap.add_argument("--width", type=float, default=1.0, help="UNet channels x this (0.5: the half-width layout)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reference", default=None, help="a folder to keep the random pipeline in (made once, "
                    "reused; `sd compile FOLDER/sd` then compiles ours ahead of time) instead of a temporary one")
    ap.add_argument("--child", choices=["diffusers", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    if args.child:
        return child(args)

    load = os.getloadavg()
    print(f"{cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; {args.size}x{args.size}, {args.steps} ddim steps, guidance 7.5, seed {SEED}; "
          f"UNet width x{args.width}; levers: convs={args.convs} channels_last={args.channels_last} "
          f"compile={args.compile}")
    with tempfile.TemporaryDirectory(prefix="sd15_bench_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        if args.reference:      # saved before (and perhaps compiled ahead: `sd compile DIR/sd ...`)
            folder = Path(args.reference) / "sd"
            if not folder.exists():
                save_reference(Path(args.reference), args.width)
            print(f"reference pipeline: {folder}")
        else:
            folder = save_reference(tmp, args.width)
            print(f"saved a random SD 1.5-architecture diffusers pipeline in {time.perf_counter() - start:.0f} s")
        results = {"diffusers": [], "ours": []}
        for r in range(args.rounds):
            for side in results:
                res = run_child(side, folder, tmp / f"{side}{r}.json", args)
                results[side].append(res)
                print(f"  round {r + 1} {side:9s}: generate {res['seconds']:.1f} s (load {res['load_s']:.1f} s), "
                      f"peak RSS {res['load_peak_mb']:.0f} MiB loading + warm-up, {res['generate_peak_mb']:.0f} MiB generating",
                      flush=True)

    med = {side: statistics.median(r["seconds"] for r in rs) for side, rs in results.items()}
    peak = {side: max(max(r["load_peak_mb"], r["generate_peak_mb"]) for r in rs) for side, rs in results.items()}
    gen_peak = {side: max(r["generate_peak_mb"] for r in rs) for side, rs in results.items()}
    diff = max(int(np.abs(a["image"] - b["image"]).max()) for a in results["diffusers"] for b in results["ours"])
    time_ratio = med["ours"] / med["diffusers"]
    mem_ratio = peak["ours"] / peak["diffusers"]
    print(f"time:   diffusers {med['diffusers']:.1f} s, ours {med['ours']:.1f} s (medians of {args.rounds}); "
          f"ratio {time_ratio:.3f} (target <= 0.85: {'met' if time_ratio <= 0.85 else 'NOT met'})")
    print(f"memory: peak RSS diffusers {peak['diffusers']:.0f} MiB, ours {peak['ours']:.0f} MiB; ratio {mem_ratio:.3f} "
          f"(target <= 1.0: {'met' if mem_ratio <= 1.0 else 'NOT met'}); generation alone: diffusers "
          f"{gen_peak['diffusers']:.0f} MiB, ours {gen_peak['ours']:.0f} MiB, ratio "
          f"{gen_peak['ours'] / gen_peak['diffusers']:.3f}")
    print(f"image:  max pixel difference {diff}/255 ({'ok' if diff <= 2 else 'TOO LARGE'}, tolerance 2/255); "
          f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
