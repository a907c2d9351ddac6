"""
The UNet compiled ahead of time: AOTInductor packages, one per input shape, built once by `sd compile` and
loaded by workers with no compilation at start-up.

    sd compile weights/ --sizes 64x64 --batch 1,2,4,8     # -> weights/compiled/<machine>/unet-2x4x8x8.pt2, ...
    pipe = StableDiffusion.from_pretrained("weights/").optimize()    # loads the packages built for this machine

torch.compile compiles on the first call of every new shape (minutes for SD 1.5 on a CPU), in every process.
Here the compiling happens once, on the machine that will serve (a package is native code for its CPU and torch
build), and its result is kept beside the weights with a manifest naming the machine, the torch version and
the weights it was built from; a package made elsewhere, or from other weights, is ignored. Each package is
timed against the eager UNet as served when it is built and is used only where it measured faster. A shape
without a package runs eager.

Memory: a package holds no weights (`package_constants_in_so=False`); it is loaded with the eager UNet's own
tensors (AOTInductor's user-managed constants), so each package costs its code (a few MB), not a second copy
of the UNet. That rules out inductor's weight freezing (which rewrites the weights, and kept a second copy of
them under torch.compile), so a package's convs are the plain kind; what it saves is Python, dispatch and
the unfused elementwise work between kernels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from .tuning import machine_name

log = logging.getLogger("sd.compiled")

MANIFEST = "manifest.json"
TOKENS = 77          # the text context's length, as the pipeline calls the UNet


def packages_dir(weights: Path) -> Path:
    """Where the packages of these weights and of this machine live: beside the weights."""
    weights = Path(weights)
    base = weights / "compiled" if weights.is_dir() else weights.with_name(weights.name + ".compiled")
    return base / hashlib.sha256(machine_name().encode()).hexdigest()[:12]


def weights_id(unet: nn.Module) -> str:
    """A fingerprint of the UNet's weights (names, shapes and sums of every tensor): other weights, other id."""
    h = hashlib.sha256()
    for name, t in unet.state_dict().items():
        t = t.detach().float()
        h.update(f"{name}{tuple(t.shape)}{t.sum().item():.6e}{t.abs().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


def shape_name(batch: int, channels: int, h: int, w: int) -> str:
    return f"{batch}x{channels}x{h}x{w}"


def _target(unet: nn.Module) -> dict:
    """What a package is native code for: this machine and torch, the UNet's device and dtype."""
    param = next(unet.parameters())
    return {"machine": machine_name(), "torch": torch.__version__, "device": param.device.type,
            "dtype": str(param.dtype).removeprefix("torch.")}


def _inputs(config, batch, h, w, dtype, device):
    """Example inputs of one shape, as the pipeline calls the UNet (t: [B] float32, context: 77 tokens)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, h, w, generator=g).to(device, dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, TOKENS, config.cross_attention_dim, generator=g).to(device, dtype)
    return x, t, context


def build(unet: nn.Module, shapes, out: Path, *, rounds: int = 3) -> dict:
    """Compile `unet` (plain and in eval mode; on CPU or GPU, in its dtype) for each (batch, h, w) latent shape
    into `out`, time each package against the eager UNet as served (its convs tuned, in place: `unet` is
    served eager afterwards) and write the manifest. Returns the manifest."""
    import torch._inductor

    from .speed import tune_convs

    out.mkdir(parents=True, exist_ok=True)
    param = next(unet.parameters())
    manifest = {**_target(unet), "weights": weights_id(unet), "packages": {}}
    constants = {k: v.detach() for k, v in unet.state_dict().items()}    # the plain tensors, before tuning
    built = {}
    for batch, h, w in shapes:
        name = shape_name(batch, unet.config.in_channels, h, w)
        args = _inputs(unet.config, batch, h, w, param.dtype, param.device)
        start = time.perf_counter()
        with torch.inference_mode():
            program = torch.export.export(unet, args)
        # no weights in the package: the loader hands it the eager UNet's tensors
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(out / f"unet-{name}.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        built[name] = (args, path, time.perf_counter() - start)
        log.info("compiled %s in %.1f s", name, built[name][2])
    tune_convs(unet)
    for name, (args, path, seconds) in built.items():
        runner = _runner(path, constants)
        with torch.inference_mode():
            want, got = unet(*args), runner(*args)
            diff = (want.float() - got.float()).abs().max().item()
            times = {"eager": [], "compiled": []}
            for _ in range(rounds):                         # interleaved, as model/tuning.py does
                for kind, fn in (("eager", unet), ("compiled", runner)):
                    t0 = time.perf_counter()
                    fn(*args)
                    times[kind].append(time.perf_counter() - t0)
        eager_s, compiled_s = (min(times[k]) for k in ("eager", "compiled"))
        ok = diff <= 1e-3 * max(1.0, want.abs().max().item())
        manifest["packages"][name] = {
            "file": Path(path).name, "compile_s": round(seconds, 1), "eager_ms": round(eager_s * 1e3, 2),
            "compiled_ms": round(compiled_s * 1e3, 2), "max_diff": diff,
            "use": bool(ok and compiled_s < 0.97 * eager_s)}
        log.info("%s: eager %.1f ms, compiled %.1f ms, max diff %.1e: %s", name, eager_s * 1e3, compiled_s * 1e3,
                 diff, "used" if manifest["packages"][name]["use"] else "not used")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _runner(path, constants: dict[str, torch.Tensor]):
    """A package loaded to run on `constants` (which the caller keeps alive: the package does not own them)."""
    import torch._inductor

    runner = torch._inductor.aoti_load_package(str(path))
    wanted = set(runner.get_constant_fqns())
    runner.load_constants({k: v for k, v in constants.items() if k in wanted}, check_full_update=True,
                          user_managed=True)
    return runner


class CompiledUNet:
    """Calls the UNet as the pipeline does: a call whose shapes have a package runs it (on the eager UNet's
    own weight tensors), any other call runs the eager UNet."""

    def __init__(self, unet: nn.Module, runners: dict[tuple, object], constants: dict[str, torch.Tensor]):
        self.unet = unet
        self.runners = runners          # (x shape, context shape) -> AOTInductor runner
        self._constants = constants     # the tensors the packages run on: kept alive here (they do not own them)
        self.calls = {"compiled": 0, "eager": 0}

    def __call__(self, x, t, context):
        runner = self.runners.get((tuple(x.shape), tuple(context.shape)))
        if runner is None:
            self.calls["eager"] += 1
            return self.unet(x, t, context)
        self.calls["compiled"] += 1
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        return runner(x.contiguous(), t, context.contiguous())


def load(unet: nn.Module, directory: Path) -> CompiledUNet | None:
    """The packages in `directory` that were built on this machine and torch, for this device and dtype, from
    these weights, and measured faster, around `unet` (plain: call it before the convs are tuned). None if none."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    here = _target(unet)
    if any(manifest.get(k) != v for k, v in here.items()):
        log.info("ignoring %s: built for %s, this is %s", directory, {k: manifest.get(k) for k in here}, here)
        return None
    if manifest.get("weights") != weights_id(unet):
        log.warning("ignoring %s: built from other weights (run sd compile again)", directory)
        return None
    constants = {k: v.detach() for k, v in unet.state_dict().items()}
    runners = {}
    for name, entry in manifest.get("packages", {}).items():
        if not entry.get("use"):
            continue
        try:
            runner = _runner(Path(directory) / entry["file"], constants)
        except (OSError, RuntimeError, KeyError) as e:
            log.warning("package %s not loaded: %s", name, e)
            continue
        batch, channels, h, w = map(int, name.split("x"))
        runners[((batch, channels, h, w), (batch, TOKENS, unet.config.cross_attention_dim))] = runner
    if not runners:
        return None
    log.info("loaded %d compiled UNet shapes from %s", len(runners), directory)
    return CompiledUNet(unet, runners, constants)
