"""LoRAs (and textual-inversion embeddings) as the service serves them: from folders, by name.

    SD_LORA_DIR=/data/loras            ink.safetensors, paper.pt, ... -> the LoRAs "ink", "paper" (file stems)
    SD_EMBEDDINGS_DIR=/data/embeddings listed at GET /sdapi/v1/embeddings (names only, for now)
    SD_LORA_CACHE_MB=1024              what a worker keeps loaded (the LoRAs' tensors), least recently used out

A request names LoRAs in its prompt, `<lora:NAME:W>` (every face), or in the native API's `loras` field,
[{"name": NAME, "scale": W}]. The API process and the workers may run on different machines, but they see one
folder (the same image, or one mounted volume):

  the API       lists the folder (Folder: re-listed when the folder's mtime changes, or on POST
                /sdapi/v1/refresh-loras) and refuses, before anything is queued, a job that names a LoRA the
                folder has not (422 naming it and the close names: check); it never reads a LoRA's weights
  the worker    loads each LoRA a job names on first use (Cache: pipe.load_lora), keeps the loaded ones within
                SD_LORA_CACHE_MB, least recently used out, and loads a file again when it changed (mtime, size).
                A LoRA that fails to load (not a LoRA, a pickle that would run code, shapes that do not fit the
                served model) fails the jobs that name it, with its error, as the request's fault ("invalid":
                a synchronous request answers 422); the other jobs of the batch run. Whether a LoRA fits the
                model is only known where the model is, at the worker: the API checks names, not shapes.

Where <lora:...> tags are taken out of the prompt: in StableDiffusion.generate (model/pipeline.py,
_with_prompt_loras), which the worker hands the prompt unchanged (its PNG records the prompt as written) with the
loras field as Request.loras.
"""

from __future__ import annotations

import difflib
import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

log = logging.getLogger("sd.loras")

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")          # in this order when two files share a stem
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
RACY_S = 2.0   # a listing made this soon after the folder last changed is not trusted (mtimes are coarse)


class LoraError(ValueError):
    """A LoRA a request names that this service cannot use (unknown, or failing to load): the request's fault."""


# -----------------------------------------------------------------------------
# a folder of files, by stem


class Folder:
    """The files of one folder with the given suffixes, {stem: path}, listed again when the folder's mtime
    changes (a file added, removed or renamed) or on refresh(). Top level only, as the names are stems."""

    def __init__(self, path, suffixes: tuple[str, ...]):
        self.path = Path(path)
        self.suffixes = suffixes
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        self._listed: Optional[int] = None      # the folder's mtime_ns the listing was made at; None: list again
        self._metadata: dict[Path, tuple] = {}  # file -> ((mtime_ns, size), metadata)

    def refresh(self) -> None:
        with self._lock:
            self._listed = None

    def files(self) -> dict[str, Path]:
        """{name: file}, sorted by name."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            mtime = -1
        with self._lock:
            if self._listed != mtime:
                self._files = self._list()
                # a change within the same clock tick as this listing would leave the mtime as it is: trust the
                # listing once the folder has been still for a while
                self._listed = mtime if time.time() - mtime / 1e9 > RACY_S else None
            return self._files

    def _list(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        try:
            entries = sorted(self.path.iterdir())
        except OSError as e:
            log.warning("cannot list %s: %s", self.path, e)
            return {}
        rank = {s: i for i, s in enumerate(self.suffixes)}
        for file in entries:
            suffix = file.suffix.lower()
            if suffix not in rank or not file.is_file():
                continue
            other = found.get(file.stem)
            if other is None or rank[suffix] < rank[other.suffix.lower()]:
                found[file.stem] = file
        return dict(sorted(found.items()))

    def names(self) -> list[str]:
        return list(self.files())

    def metadata(self, file: Path) -> dict:
        """A .safetensors file's own metadata (its header's __metadata__, JSON-looking values parsed, as the web
        UI's read_metadata_from_safetensors does); {} for other files or an unreadable header."""
        if file.suffix.lower() != ".safetensors":
            return {}
        try:
            st = file.stat()
        except OSError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        cached = self._metadata.get(file)
        if cached is None or cached[0] != key:
            cached = self._metadata[file] = (key, _safetensors_metadata(file))
        return cached[1]


def _safetensors_metadata(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 * 1024 * 1024:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    out = {}
    for k, v in (header.get("__metadata__") or {}).items() if isinstance(header, dict) else ():
        if isinstance(v, str) and v[:1] == "{":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


_folders: dict[tuple, Folder] = {}
_folders_lock = threading.Lock()


def lora_folder(settings) -> Optional[Folder]:
    """The LoRA folder of these settings (one Folder per path and process); None without SD_LORA_DIR."""
    return _folder(settings.lora_dir, LORA_SUFFIXES)


def embeddings_folder(settings) -> Optional[Folder]:
    return _folder(settings.embeddings_dir, EMBEDDING_SUFFIXES)


def _folder(path, suffixes) -> Optional[Folder]:
    if not path:
        return None
    with _folders_lock:
        key = (str(Path(path).resolve()), suffixes)
        if key not in _folders:
            _folders[key] = Folder(path, suffixes)
        return _folders[key]


# -----------------------------------------------------------------------------
# what a job asks for, and the API's check


def field_loras(entries) -> dict[str, float]:
    """The native `loras` field, [{"name", "scale"}], as {name: weight} (a name twice: the weights add up)."""
    out: dict[str, float] = {}
    for entry in entries or ():
        out[entry["name"]] = out.get(entry["name"], 0.0) + float(entry.get("scale", 1.0))
    return out


def prompt_loras(prompt: str) -> dict[str, float]:
    """The <lora:NAME:W> tags of a prompt, {name: weight}; ValueError "prompt: ..." for a tag the pipeline refuses."""
    from model.prompts import extract_lora_tags

    try:
        return extract_lora_tags(prompt)[1]
    except ValueError as e:
        raise LoraError(f"prompt: {e}") from None


def wanted(params: dict) -> set[str]:
    """Every LoRA a job's parameters name: its prompt's tags and its `loras` field."""
    return set(prompt_loras(params.get("prompt") or "")) | set(field_loras(params.get("loras")))


def check(settings, params: dict) -> None:
    """LoraError (the API answers 422) naming the first LoRA the job names that SD_LORA_DIR does not hold, and
    the close names, or a tag the pipeline would refuse. The negative prompt's tags stay text (the pipeline's
    rule, as the web UI's), so they are not checked. A prompt or negative prompt whose emphasis syntax the pipeline
    would refuse (a weight such as (a:1.2.3)) is a 422 too: a bad prompt must not reach a batch."""
    from model.prompts import parse_attention

    for field in ("prompt", "negative_prompt"):
        try:
            parse_attention(params.get(field) or "")
        except ValueError as e:
            raise LoraError(f"{field}: {e}") from e
    tags = prompt_loras(params.get("prompt") or "")
    fields = field_loras(params.get("loras"))
    if not tags and not fields:
        return
    folder = lora_folder(settings)
    names = folder.names() if folder is not None else []
    for where, asked in (("prompt", tags), ("loras", fields)):
        for name in asked:
            if name not in names:
                raise LoraError(f"{where}: {unknown(name, names, folder)}")
    for name, weight in tags.items():     # (the field's own range is the schema's)
        total = weight + fields.get(name, 0.0)
        if not -10 <= total <= 10:
            raise LoraError(f"prompt: the weight of LoRA {name!r} must be a number in [-10, 10] (its tags and the "
                            f"loras field together), got {total:g}")


def unknown(name: str, names: list[str], folder: Optional[Folder]) -> str:
    if folder is None:
        return f"unknown LoRA {name!r}: this server serves no LoRAs (SD_LORA_DIR is not set)"
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else \
        f"{len(names)} LoRA{'s' if len(names) != 1 else ''} served, none close; GET /sdapi/v1/loras lists them"
    return f"unknown LoRA {name!r} ({hint})"


# -----------------------------------------------------------------------------
# the worker's side


def tensor_bytes(lora) -> int:
    """The bytes a loaded LoRA's tensors take (model.lora.LoRA: each Delta's down and up)."""
    return sum(t.nelement() * t.element_size() for d in lora.deltas.values() for t in (d.down, d.up))


class Cache:
    """A worker's loaded LoRAs: loaded on first use (pipe.load_lora(file, name)), again when the file changed
    (its mtime or size), and kept within `budget_bytes` of tensors, the least recently used ones unloaded
    first (never one the running batch uses: a batch whose LoRAs together pass the budget still runs, and the
    cache is back within it after the next load). Unloading takes the LoRA out of pipe.adapters.loras: the
    hooks it left on layers add nothing without it, and a later load_lora of the name drops the prompt
    encodings made with it."""

    def __init__(self, pipe, folder: Optional[Folder], budget_bytes: int):
        self.pipe, self.folder, self.budget = pipe, folder, budget_bytes
        self.loaded: OrderedDict[str, tuple] = OrderedDict()   # name -> ((file, mtime_ns, size), bytes); LRU first
        self.loads = 0                                          # files loaded (tests, logs)

    @property
    def used(self) -> int:
        return sum(b for _, b in self.loaded.values())

    def ensure(self, names, keep=()) -> None:
        """Have these LoRAs loaded and fresh; LoraError naming the one that cannot be (unknown, gone, or not
        loadable: its load error). `keep`: names the batch being prepared uses, never unloaded here."""
        if not names:
            return
        if self.folder is None:
            raise LoraError(f"loras: this worker serves no LoRAs (SD_LORA_DIR is not set); asked for "
                            f"{', '.join(sorted(names))}")
        files = self.folder.files()
        for name in sorted(names):
            file = files.get(name)
            if file is None:
                self.folder.refresh()   # the API saw it: perhaps this listing is older than the file
                files = self.folder.files()
                file = files.get(name)
            if file is None:
                raise LoraError(f"loras: {unknown(name, list(files), self.folder)}")
            self._load(name, file)
        self._evict(set(names) | set(keep))

    def _load(self, name: str, file: Path) -> None:
        try:
            st = file.stat()
        except OSError as e:
            raise LoraError(f"LoRA {name!r}: {file}: {e}") from None
        stamp = (file, st.st_mtime_ns, st.st_size)
        have = self.loaded.get(name)
        if have is not None and have[0] == stamp and name in self.pipe.adapters.loras:
            self.loaded.move_to_end(name)
            return
        self.loaded.pop(name, None)
        start = time.perf_counter()
        try:
            self.pipe.load_lora(file, name)       # LoRAError (a ValueError) when it cannot be used
        except ValueError as e:
            self.pipe.adapters.loras.pop(name, None)   # (an older file of the name is not served either)
            raise LoraError(str(e)) from None
        self.loads += 1
        size = tensor_bytes(self.pipe.adapters.loras[name])
        self.loaded[name] = (stamp, size)
        log.info("loaded LoRA %s (%s, %.1f MB) in %.2f s", name, file, size / 2**20, time.perf_counter() - start)

    def _evict(self, keep: set) -> None:
        for name in list(self.loaded):
            if self.used <= self.budget:
                return
            if name in keep:
                continue
            self.loaded.pop(name)
            self.pipe.adapters.loras.pop(name, None)
            log.info("unloaded LoRA %s (SD_LORA_CACHE_MB)", name)
