"""The `sd` command line.

    sd generate --mode text-to-image --prompt "a red circle on a blue background"
    sd generate --mode image-to-image --input-image in.png --strength 0.6 --prompt "a blue circle"
    sd inpaint --input-image in.png --mask mask.png --prompt "a yellow square"
    sd convert path/to/v1-5.safetensors weights/sd15 --tokenizer path/to/tokenizer

Heavy imports (torch, the model) happen inside the commands, so `sd --help`
answers at once. Progress bars (tqdm) go to stderr and only when it is a terminal;
stdout carries the results (the files written), so scripts can read it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"

EPILOG = """examples:
  sd generate --mode text-to-image --prompt "a large red circle in the center on a blue background"
  sd generate --mode image-to-image --input-image in.png --strength 0.7 --prompt "a blue circle"
  sd inpaint --input-image in.png --mask mask.png --prompt "a yellow square in the top left"
  sd generate --prompt "a red circle, ink style" --lora ink.safetensors:0.8 --embedding style.pt
  sd convert v1-5-pruned-emaonly.safetensors weights/sd15 --tokenizer ./clip-tokenizer
  sd compile weights/ --sizes 64x64 --batch 1,2,4,8   # the UNet compiled ahead of time, for this machine
  sd train --config configs/tiny.yaml        # retrain the default model (about an hour on 2 cores)
  sd eval                                    # how well the default model follows its prompts
  sd serve                                   # HTTP API + in-process worker on 127.0.0.1:8000
  sd worker --redis redis://localhost:6379/0 # a batching worker beside `sd serve --redis ...`

`sd COMMAND --help` shows each command's options and more examples.
"""

# each subcommand's --help ends with its own examples
EXAMPLES = {
    "generate": """examples:
  sd generate --prompt "a large red circle in the center on a blue background" --seed 42 --out red.png
  sd generate --mode image-to-image --input-image red.png --strength 0.7 \\
      --prompt "a large blue circle in the center on a yellow background" --out blue.png
  sd generate --prompt "a small green square" --num-images 4 --sampler dpmpp_2m_karras --steps 25
  sd generate --weights path/to/sd15 --device cuda --dtype fp16 --width 512 --height 512 \\
      --prompt "a lighthouse on a cliff at dusk" --negative-prompt "blurry"
  sd generate --prompt "a red circle, (ink:1.2) style" --lora ink.safetensors:0.8 --embedding style.pt

A progress bar goes to stderr when it is a terminal (--quiet: none); stdout lists the files written
and their seeds.
""",
    "inpaint": """examples:
  sd inpaint --input-image photo.png --mask mask.png --prompt "a yellow square in the top left"
  sd inpaint --input-image holed.png --prompt "a red circle"     # repaints the transparent pixels
  sd inpaint --input-image photo.png --mask mask.png --strength 0.6 --seed 7 --prompt "a blue square"

The mask is white where to repaint and black where to keep; every pixel outside it comes back unchanged.
""",
    "convert": """examples:
  sd convert v1-5-pruned-emaonly.safetensors weights/sd15 --tokenizer ./clip-tokenizer
  sd convert path/to/diffusers-model weights/mymodel     # a diffusers folder carries its tokenizer
""",
    "compile": """examples:
  sd compile weights/ --sizes 64x64 --batch 1,2,4,8          # the default model, the service's batch sizes
  sd compile weights/sd15 --sizes 512x512 --batch 1          # one SD 1.5 shape (minutes on a CPU)
  sd compile weights/sd15 --sizes 512x512 --device cuda --dtype fp16

Packages go beside the weights (WEIGHTS/compiled/<machine>/, or FILE.compiled/<machine>/ for one file), with
a manifest naming the machine, torch, device, dtype and weights they were built for; `sd serve`, `sd worker`
and `sd generate` load those built here and use each only where it measured faster than eager (printed
below). A guided image runs the UNet at batch 2, so --batch N compiles UNet batch 2N.
""",
    "train": """examples:
  sd train --config configs/tiny.yaml                  # the default model, from scratch
  sd train --config configs/tiny.yaml --resume         # continue after an interruption
  sd train --config configs/tiny.yaml --out runs/try2  # somewhere else than the config's out_dir

A progress bar per phase (VAE, then diffusion) goes to stderr on a terminal; elsewhere a line every
25 steps. --quiet: neither.
""",
    "eval": """examples:
  sd eval                                        # the default model in weights/
  sd eval --weights runs/tiny/weights --guidance 7.5 --json scores.json
""",
    "serve": """examples:
  sd serve                                                   # http://127.0.0.1:8000, the page at /
  sd serve --host 0.0.0.0 --port 8080 --device cuda --dtype fp16
  SD_API_KEYS=secret1,secret2 sd serve                       # require Authorization: Bearer secret1
  sd serve --redis redis://localhost:6379/0                  # API only; run `sd worker` beside it
""",
    "worker": """examples:
  sd worker --redis redis://localhost:6379/0 --device cuda
  sd worker --redis redis://queue-host:6379/0 --max-batch 16 --batch-window 0.05
""",
}
# written out here because importing model.samplers imports torch, and --help must answer at once;
# tests/test_cli.py checks it against model.samplers.SAMPLERS
SAMPLER_NAMES = "ddim, ddpm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, euler_karras, euler_a_karras"


def _subparser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                          epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)


def default_weights() -> str:
    return os.environ.get("SD_WEIGHTS", str(DEFAULT_WEIGHTS))


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", "--negative_prompt", default="", help="what to steer away from")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--guidance", "--guidance-scale", type=float, default=7.5, dest="guidance",
                   help="classifier-free guidance scale; 1 = none (default: 7.5)")
    p.add_argument("--sampler", default="ddim", help=f"one of {SAMPLER_NAMES} (default: ddim)")
    p.add_argument("--seed", type=int, default=None, help="random when left out; printed either way")
    p.add_argument("--width", type=int, default=None, help="a multiple of 8; default: the model's native size")
    p.add_argument("--height", type=int, default=None, help="a multiple of 8; default: the model's native size")
    p.add_argument("--num-images", "--num_images", type=int, default=1, help="images from one noise draw")
    p.add_argument("--weights", default=None, help="native dir, diffusers dir or one .safetensors/.ckpt (default: weights/)")
    p.add_argument("--out", default="out.png", help="output PNG; several images get -0, -1, ... suffixes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--input-image", "--input_image", dest="input_image", default=None,
                   help="the image to start from (image-to-image, inpaint)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="how far to move from the input image, 0 to 1 (default: 0.75)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA (kohya or diffusers/PEFT .safetensors) applied at WEIGHT (default 1); repeatable. "
                        "Loaded under the file's stem, which <lora:STEM:W> tags in the prompt also name")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual inversion embedding; write the file's stem in the prompt to use it; repeatable")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _lora_arg(value: str) -> tuple[str, float]:
    """'ink.safetensors:0.8' -> ('ink.safetensors', 0.8); no ':WEIGHT' (or a path with colons) -> weight 1."""
    file, sep, weight = value.rpartition(":")
    try:
        return (file, float(weight)) if sep else (value, 1.0)
    except ValueError:
        return value, 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd",
        description="Stable Diffusion from scratch: generate, inpaint, convert weights.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = _subparser(sub, "generate", "text-to-image or image-to-image")
    gen.add_argument("--mode", choices=["text-to-image", "image-to-image"], default="text-to-image")
    _add_generation_args(gen)

    inp = _subparser(sub, "inpaint", "repaint the masked (white) or transparent part of an image")
    _add_generation_args(inp)
    inp.add_argument("--mask", default=None, help="white = repaint; default: the input's transparent pixels")

    conv = _subparser(sub, "convert", "convert a diffusers dir or original checkpoint to the native layout")
    conv.add_argument("src", help="a diffusers folder, or one original .safetensors/.ckpt file")
    conv.add_argument("dst", help="the native weights folder to write")
    conv.add_argument("--tokenizer", default=None, help="dir with vocab.json + merges.txt or tokenizer.json "
                      "(single files carry none)")
    comp = _subparser(sub, "compile", "compile the UNet ahead of time for this machine, per image size and batch")
    comp.add_argument("weights", help="the weights to compile (native dir, diffusers dir or one file)")
    comp.add_argument("--sizes", default=None, help="image sizes WxH, comma-separated (default: the native size)")
    comp.add_argument("--batch", default="1", help="images per batch, comma-separated (default: 1)")
    comp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    comp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    _add_service_commands(sub)
    _add_train_command(sub)
    _add_eval_command(sub)
    return parser


def _add_train_command(sub) -> None:
    """`sd train --config configs/tiny.yaml [--resume] [--out DIR]` (model/train.py)."""
    tr = _subparser(sub, "train", "train a model from scratch from a YAML config (configs/tiny.yaml)")
    tr.add_argument("--config", required=True, help="training config, e.g. configs/tiny.yaml")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    tr.add_argument("--out", default=None, help="output dir (default: the config's out_dir)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import ConfigError, load_config, train

    bars = TrainBar if sys.stderr.isatty() else None  # None: train's own line every 25 steps, for logs
    try:
        train(load_config(args.config), out_dir=args.out, resume=args.resume, quiet=args.quiet, progress=bars)
    except (ConfigError, FileNotFoundError) as e:
        print(f"sd train: {e}", file=sys.stderr)
        return 2
    return 0


def _add_eval_command(sub) -> None:
    p = _subparser(sub, "eval", "prompt-adherence score of a shapes model (the default model)")
    p.add_argument("--weights", default=None, help="default: weights/")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5])
    p.add_argument("--variants", type=int, default=3, help="prompts per (colour, shape) pair (24 pairs)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the scores to this JSON file")


def cmd_eval(args: argparse.Namespace) -> int:
    """Score the data set's own images (the classifier's ceiling), then the model's, per guidance scale."""
    import json

    from model import StableDiffusion
    from model.shapes_eval import eval_prompts, format_scores, generate, ground_truth, score_split

    specs = eval_prompts(args.variants)
    held_out = sum(s.held_out for s in specs)
    print(f"{len(specs)} prompts ({len(specs) - held_out} of seen pairs, {held_out} of held-out pairs), "
          f"{args.steps} {args.sampler} steps, seed = prompt index")
    report = {"ground_truth": ground_truth(specs)}
    print(format_scores("data set images (classifier on ground truth):", report["ground_truth"]))
    pipe = StableDiffusion.from_pretrained(args.weights or default_weights()).optimize()
    for g in args.guidance:
        images = generate(pipe, specs, guidance_scale=g, steps=args.steps, sampler=args.sampler)
        report[f"guidance {g:g}"] = score_split(images, specs)
        print(format_scores(f"model, guidance {g:g}:", report[f"guidance {g:g}"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _add_service_commands(sub) -> None:
    """`sd serve` and `sd worker` (service/api.py, service/worker.py); flags in service/settings.py."""
    from service.settings import add_arguments

    serve = _subparser(sub, "serve", "the HTTP API and web page (with an in-process worker unless --redis is given)")
    add_arguments(serve, http=True)
    worker = _subparser(sub, "worker", "a batching worker on the Redis queue (sd worker --redis URL)")
    add_arguments(worker, http=False)


def cmd_service(args: argparse.Namespace) -> int:
    from service.settings import Settings

    try:
        settings = Settings.from_args(args)
    except ValueError as e:
        print(f"sd {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from service.api import main as serve_main

        return serve_main(settings)
    from service.worker import main as worker_main

    return worker_main(settings)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class StepBar:
    """A tqdm bar on stderr fed by the pipeline's callback(step, total); none when disabled."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainBar:
    """model.train's progress report as a tqdm bar on stderr: one per phase, with the smoothed loss."""

    def __init__(self, name: str, total: int, start: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.loss = None

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        self.bar.set_postfix(loss=f"{self.loss:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)
        if step >= self.bar.total:
            self.bar.close()


def _out_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def cmd_generate(args: argparse.Namespace) -> int:
    import random

    from PIL import Image

    from model import StableDiffusion
    from model.pnginfo import png_bytes

    mode = "inpaint" if args.command == "inpaint" else args.mode
    if mode != "text-to-image" and not args.input_image:
        print(f"sd {args.command}: --input-image is required for {mode}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None and args.seed >= 0 else random.randrange(2**32)
    pipe = StableDiffusion.from_pretrained(args.weights or default_weights(), device=args.device,
                                           dtype=_dtype(args.dtype)).optimize()
    loras = {}
    try:
        for value in args.lora:
            file, weight = _lora_arg(value)
            name = pipe.load_lora(file)
            loras[name] = loras.get(name, 0.0) + weight
        for file in args.embedding:
            pipe.load_embedding(file)
    except ValueError as e:      # (WeightsError / LoRAError: a file that is missing, unsafe or does not fit)
        print(f"sd {args.command}: {e}", file=sys.stderr)
        return 2
    progress = StepBar({"text-to-image": "txt2img", "image-to-image": "img2img"}.get(mode, mode),
                       enabled=sys.stderr.isatty() and not args.quiet)
    common = dict(
        negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
        sampler=args.sampler, seed=seed, num_images=args.num_images, callback=progress, loras=loras or None,
    )
    try:
        if mode == "text-to-image":
            images = pipe.txt2img(args.prompt, width=args.width, height=args.height, **common)
        else:
            image = Image.open(args.input_image)
            image.load()
            if mode == "image-to-image":
                images = pipe.img2img(image, args.prompt, strength=args.strength, width=args.width,
                                      height=args.height, **common)
            else:
                mask = Image.open(args.mask) if args.mask else None
                images = pipe.inpaint(image, mask, args.prompt, strength=args.strength, **common)
    except ValueError as e:
        progress.close()
        print(f"sd {args.command}: {e}", file=sys.stderr)
        return 2
    for i, (img, path) in enumerate(zip(images, _out_paths(args.out, len(images)))):
        params = img.info["generation"]
        path.write_bytes(png_bytes(img, params))
        print(f"{path}  seed={params['seed']}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from model.weights import WeightsError, convert

    try:
        convert(args.src, args.dst, tokenizer=args.tokenizer)
    except WeightsError as e:
        print(f"sd convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import logging

    from model import StableDiffusion, compiled

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        batches = [int(b) for b in args.batch.split(",")]
        pipe = StableDiffusion.from_pretrained(args.weights, device=args.device, dtype=_dtype(args.dtype))
        n = pipe.native_size
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")] if args.sizes else [(n, n)]
        f, m = pipe.latent_factor, max(8, pipe.latent_factor)        # sizes as the pipeline takes them
        if any(b < 1 for b in batches) or any(len(s) != 2 or s[0] % m or s[1] % m or min(s) < m for s in sizes):
            raise ValueError(f"--batch takes integers >= 1; --sizes takes WxH, positive multiples of {m}")
    except ValueError as e:
        print(f"sd compile: {e}", file=sys.stderr)
        return 2
    shapes = [(2 * b, h // f, w // f) for w, h in sizes for b in batches]
    out = compiled.packages_dir(pipe.source)
    manifest = compiled.build(pipe.unet, shapes, out)
    print(f"wrote {out}")
    print("| UNet input | compile s | eager ms | compiled ms | used |\n|---|---|---|---|---|")
    for name, e in manifest["packages"].items():
        print(f"| {name} | {e['compile_s']} | {e['eager_ms']} | {e['compiled_ms']} | {'yes' if e['use'] else 'no'} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "inpaint"):
        return cmd_generate(args)
    if args.command == "convert":
        return cmd_convert(args)
    if args.command == "compile":
        return cmd_compile(args)
    if args.command in ("serve", "worker"):
        return cmd_service(args)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "eval":
        return cmd_eval(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
