"""
Speed levers chosen by measurement, per layer shape, on the machine at hand.

Which way of running a layer is fastest depends on the processor, the torch build, the thread count and the
layer's shape. oneDNN's prepacked 3x3 convolutions, for one, run 4x faster than plain ones at 1280 channels on
4x4 latents on an Intel Xeon with AVX-512, and 2-5x slower at 320-640 channels on an AMD EPYC with AVX2
(docs/performance.md). So no lever is on because it won somewhere else: a Tuner times the candidates on the
real input the first time a shape comes, keeps the fastest, and answers from memory after that.

    tuner = Tuner()                                           # one per model
    name, y = tuner.run(key, {"plain": f, "prepacked": g})    # the first call of `key` times f and g;
                                                              # later calls of `key` run the winner only

The rules:
- The first candidate ("plain") is the reference. Another is kept only if its output equals the reference's
  within float round-off (its probe) and it is faster by more than `margin`; one that raises or gives another
  answer is dropped, and a tie goes to the reference: the choice is never slower than plain where measured.
- The output returned while measuring is the chosen candidate's own, so the first call of a shape computes
  exactly what the later ones do (the same seed gives the same bytes from the first request on).
- Bounded: at most `budget_s` seconds of measuring per tuner; once it is spent, new shapes run the reference,
  unmeasured (a later process, reading the cache, measures them). Each candidate is called once to warm up
  (oneDNN creates its primitive, a weight is packed) and then timed up to `repeats` times, fewer once
  `min_time_s` is reached or when its first timed call takes `give_up` times the best so far.
- Decisions are kept in a small JSON file (`cache`, default `~/.cache/sd-from-scratch/tuning.json`, or the
  SD_TUNE_CACHE variable; "off" for none) under the machine's name (CPU model, ISA, torch version, threads),
  so a restarted worker does not measure again, and a file carried to another machine is not believed there.

`Fixed(name)` answers the same for every key, without measuring: the levers named by hand (`--optimize prepack`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

log = logging.getLogger("sd.tuning")

T = TypeVar("T")
REFERENCE = "plain"


class Fixed:
    """Always the same candidate (the reference when a key has no such candidate); nothing is measured."""

    def __init__(self, choice: str):
        self.initial = choice     # the form a layer should hold before its first call

    def run(self, key: str, candidates: dict[str, Callable[[], T]]) -> tuple[str, T]:
        name = self.initial if self.initial in candidates else next(iter(candidates))
        return name, candidates[name]()


class Tuner:
    """Times the candidates of a key on its first call and remembers the fastest (see the module docstring)."""

    initial = REFERENCE

    def __init__(self, *, cache: Optional[os.PathLike | str] = "default", budget_s: float = 10.0,
                 margin: float = 0.03, repeats: int = 5, min_time_s: float = 0.05, give_up: float = 4.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.budget_s, self.margin, self.repeats, self.min_time_s, self.give_up = (
            budget_s, margin, repeats, min_time_s, give_up)
        self.clock = clock
        self.spent_s = 0.0                       # seconds spent measuring so far
        self.choices: dict[str, str] = {}        # key -> chosen candidate, for this process
        self.timings: dict[str, dict[str, float]] = {}   # key -> {candidate: best seconds} (measured here)
        self.unmeasured: set[str] = set()        # keys that came after the budget was spent
        self.cache = default_cache_path() if cache == "default" else (Path(cache) if cache else None)
        self.machine = machine_name()
        self.choices.update(_read_cache(self.cache, self.machine))

    def run(self, key: str, candidates: dict[str, Callable[[], T]]) -> tuple[str, T]:
        """The chosen candidate's name and output for this call; measures first if `key` is new."""
        name = self.choices.get(key)
        if name in candidates:
            return name, candidates[name]()
        if self.spent_s >= self.budget_s:
            if key not in self.unmeasured:
                log.info("tuning budget of %.1f s spent: %s runs %s, unmeasured", self.budget_s, key, REFERENCE)
                self.unmeasured.add(key)
            name = next(iter(candidates))
            self.choices[key] = name
            return name, candidates[name]()
        start = self.clock()
        try:
            name, out = self._measure(key, candidates)
        finally:
            self.spent_s += self.clock() - start
        self.choices[key] = name
        if self.cache is not None:
            _write_cache(self.cache, self.machine, {key: name})
        return name, out

    def _measure(self, key, candidates):
        ref_name = next(iter(candidates))
        reference, results = None, {}            # results: name -> (best seconds, last output)
        for i, (name, fn) in enumerate(candidates.items()):
            try:
                out = fn()                       # warm-up: primitives created, weights packed, pages touched
            except (RuntimeError, NotImplementedError) as e:
                if i == 0:
                    raise
                log.info("%s: %s failed (%s), dropped", key, name, e)
                continue
            if i == 0:
                reference = out
            elif not _same(out, reference):
                log.warning("%s: %s gives another answer than %s, dropped", key, name, ref_name)
                continue
            best_so_far = min((t for t, _ in results.values()), default=float("inf"))
            times = []
            while len(times) < self.repeats and (not times or sum(times) < self.min_time_s):
                t0 = self.clock()
                out = fn()
                times.append(self.clock() - t0)
                if times[0] > self.give_up * best_so_far:
                    break                         # hopeless: not worth timing further
            results[name] = (min(times), out)
        best = min(results, key=lambda n: results[n][0])
        if results[best][0] > results[ref_name][0] * (1 - self.margin):
            best = ref_name                       # within the margin: a tie, the reference keeps it
        self.timings[key] = {n: t for n, (t, _) in results.items()}
        log.debug("%s: %s (%s)", key, best, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, (t, _) in results.items()))
        return best, results[best][1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within float round-off (sums taken in another order), relative to the output's scale."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    scale = b.abs().max().item() if b.numel() else 0.0
    return bool(torch.isfinite(a).all()) and (a - b).abs().max().item() <= 1e-4 * scale + 1e-6


# -----------------------------------------------------------------------------
# the cache file


def default_cache_path() -> Optional[Path]:
    value = os.environ.get("SD_TUNE_CACHE")
    if value is not None:
        return None if value.strip().lower() in ("", "off", "none") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sd-from-scratch" / "tuning.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):        # x86 / some ARM kernels
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """What a measurement holds for: CPU model, the ISA torch uses, torch version and thread count."""
    return (f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def _read_cache(path: Optional[Path], machine: str) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    try:
        section = json.loads(path.read_text()).get(machine, {})
        return {k: v for k, v in section.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring the tuning cache %s: %s", path, e)
        return {}


def _write_cache(path: Path, machine: str, new: dict[str, str]) -> None:
    """Merge `new` into the file's section for this machine, replacing the file atomically (workers sharing
    one file keep each other's decisions; a write that fails costs a re-measurement, nothing else)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        section = data.get(machine) if isinstance(data.get(machine), dict) else {}
        data[machine] = {**section, **new}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the tuning cache %s: %s", path, e)
