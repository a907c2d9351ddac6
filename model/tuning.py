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
  exactly what the later ones do (the same seed gives the same bytes from the first request on). No output is
  held while another candidate runs, so measuring takes no more memory than running.
- Bounded: at most `budget_s` seconds of measuring per tuner; once it is spent, new shapes run the reference,
  unmeasured (a later process, reading the cache, measures them). Each candidate is called once to warm up
  (oneDNN creates its primitive, a weight is packed), then all are timed in up to `repeats` interleaved
  rounds, fewer once each has run `min_time_s`; one whose first timed call takes `give_up` times the best
  is not timed further.
- Decisions are kept in a small JSON file (`cache`, default `~/.cache/sd-from-scratch/tuning.json`, or the
  SD_TUNE_CACHE variable; "off" for none) under the machine's name (CPU model, ISA, torch version, threads),
  so a restarted worker does not measure again, and a file carried to another machine is not believed there.

`Fixed(name)` answers the same for every key, without measuring: the levers named by hand (`--optimize prepack`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import sys
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
        if self.spent_s >= self.budget_s:       # once per key: its choice is remembered below
            log.info("tuning budget of %.1f s spent: %s runs %s, unmeasured", self.budget_s, key, REFERENCE)
            self.unmeasured.add(key)
            name = next(iter(candidates))
            self.choices[key] = name
            return name, candidates[name]()
        start = self.clock()
        try:
            name, out = self._measure(key, candidates)
        finally:
            release_freed_memory()
            self.spent_s += self.clock() - start
        self.choices[key] = name
        if self.cache is not None:
            _write_cache(self.cache, self.machine, {key: name})
        return name, out

    def _measure(self, key, candidates):
        # Each candidate is called once to warm up and be probed, then they are timed in rounds, one call of
        # each a round (A, B, A, B, ...), so that what the machine does meanwhile hits them alike. No output is
        # kept while another candidate runs (only a sample of the reference's, to probe the others with), so
        # measuring a layer takes no more memory than running it; the winner runs once more to give its output.
        ref_name = next(iter(candidates))
        probe, timed = None, []
        for name, fn in candidates.items():
            try:
                out = fn()                       # warm-up: primitives created, weights packed, pages touched
            except (RuntimeError, NotImplementedError) as e:
                if name == ref_name:
                    raise
                log.info("%s: %s failed (%s), dropped", key, name, e)
                continue
            if name == ref_name:
                probe = _sample(out)
            elif not _same(_sample(out), probe):
                log.warning("%s: %s gives another answer than %s, dropped", key, name, ref_name)
                continue
            out = None
            timed.append(name)
        times = {name: [] for name in timed}
        for round_ in range(self.repeats):
            for name in timed:
                t0 = self.clock()
                candidates[name]()                # its output is freed at once
                times[name].append(self.clock() - t0)
            if round_ == 0:                       # hopeless ones are not timed any further
                best = min(t[0] for t in times.values())
                timed = [n for n in timed if n == ref_name or times[n][0] <= self.give_up * best]
            if min(sum(times[n]) for n in timed) >= self.min_time_s:
                break
        times_of = {name: min(t) for name, t in times.items()}
        self.timings[key] = times_of
        log.debug("%s: %s", key, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times_of.items()))
        others = [n for n in times_of if n != ref_name]
        fastest = min(others, key=times_of.get, default=None)
        if fastest is None or times_of[fastest] > times_of[ref_name] * (1 - self.margin):
            fastest = ref_name                    # a tie within the margin goes to the reference
        return fastest, candidates[fastest]()


def release_freed_memory() -> None:
    """Hand the memory that glibc's malloc holds freed back to the system (malloc_trim). Measuring allocates and
    frees outputs and weight copies of every size in turn; glibc keeps what is freed in its heap, so without
    this a process would stay about 20% bigger after measuring than before (SD 1.5 at half width)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc (musl, ...): nothing to trim with
            pass


def _sample(t: torch.Tensor, side: int = 64) -> torch.Tensor:
    """A copy of every element of the first dimensions and of a grid of at most side x side (+ 1) positions of the
    last two: first and last rows and columns always, the rest at odd strides so as not to fall in step with
    blocked layouts. Enough to tell a kernel that computes something else (a wrong border, a wrong channel
    order), small enough to keep (at most 4 MiB for SD's VAE)."""
    if t.dim() < 2:
        return t.clone()
    for dim in (-2, -1):
        n = t.shape[dim]
        step = max(1, -(-n // side)) | 1                          # ceil(n / side), made odd
        index = torch.cat([torch.arange(0, n, step), torch.tensor([n - 1])]).unique().to(t.device)
        t = t.index_select(dim, index)
    return t


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
