"""The checkpoints this service can serve, by name: the default model (`weights`, always there) and every
checkpoint of the models folder (`models_dir`), in any layout the loader reads (model/weights: a native
folder, a diffusers folder, one original .safetensors / .ckpt file).

  name       the folder's name or the file's stem ("sd_xl_base_1.0" for sd_xl_base_1.0.safetensors)
  hash       the web UI's short hash: the first 10 hex digits of the sha256 of the checkpoint file (of a
             folder: of its UNet weights file); computed on first use, kept while the file is unchanged
  title      "name [hash]", as the web UI lists checkpoints and as clients send them back

A client may name a model by its name, its title, its file name or its hash (`find`). The folder is listed
again on `refresh()` and whenever its modification time changes, so a checkpoint copied in is served without a
restart. API and workers each hold a Registry over the same folder; they agree on names because names are
made from the files alone.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")
HASH_CHUNK = 1 << 20


class UnknownModel(ValueError):
    def __init__(self, name: str, available: list[str]):
        self.name, self.available = name, available
        super().__init__(f"model {name!r} is not one of this server's models: {', '.join(available)}")


@dataclass(frozen=True)
class Checkpoint:
    name: str
    path: Path

    @property
    def filename(self) -> str:
        return self.path.name

    def hash_file(self) -> Optional[Path]:
        """The file whose sha256 names this checkpoint: itself, or a folder's UNet weights."""
        if self.path.is_file():
            return self.path
        for candidate in ("unet.safetensors", "unet/diffusion_pytorch_model.safetensors",
                          "unet/diffusion_pytorch_model.bin", "model.safetensors"):
            if (self.path / candidate).is_file():
                return self.path / candidate
        files = sorted(self.path.glob("*.safetensors"))
        return files[0] if files else None


def looks_like_checkpoint(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_file():
        return path.suffix.lower() in CHECKPOINT_SUFFIXES
    return path.is_dir() and ((path / "config.json").is_file() or (path / "model_index.json").is_file())


class Registry:
    """The default model plus the models folder's checkpoints; thread-safe."""

    def __init__(self, weights, models_dir=None):
        self.default = Checkpoint(Path(weights).stem or "model", Path(weights))
        self.folder = Path(models_dir) if models_dir else None
        self._lock = threading.Lock()
        self._listed: Optional[tuple[tuple, dict[str, Checkpoint]]] = None   # (mtimes, name -> checkpoint)
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}            # file -> ((mtime_ns, size), sha256)

    @classmethod
    def from_settings(cls, settings) -> "Registry":
        return cls(settings.weights, settings.models_dir)

    def refresh(self) -> None:
        with self._lock:
            self._listed = None

    def checkpoints(self) -> dict[str, Checkpoint]:
        """name -> checkpoint, the default model first; a folder entry named like the default model is left out
        (the default keeps its name)."""
        found = {self.default.name: self.default}
        if self.folder is None:
            return found
        try:   # (a folder being copied in changes its own mtime, not the parent's: both are in the key)
            mtime = (self.folder.stat().st_mtime_ns,
                     tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.folder.iterdir() if p.is_dir())))
        except OSError:
            return found
        with self._lock:
            if self._listed is None or self._listed[0] != mtime:
                listed = {}
                for path in sorted(self.folder.iterdir()):
                    if looks_like_checkpoint(path):
                        name = path.stem if path.is_file() else path.name
                        listed.setdefault(name, Checkpoint(name, path))
                self._listed = (mtime, listed)
            for name, checkpoint in self._listed[1].items():
                found.setdefault(name, checkpoint)
        return found

    def names(self) -> list[str]:
        return list(self.checkpoints())

    def sha256(self, checkpoint: Checkpoint) -> Optional[str]:
        """The full sha256 of the checkpoint's file (None: a folder with no weights file), cached."""
        file = checkpoint.hash_file()
        if file is None:
            return None
        stat = file.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            known = self._hashes.get(file)
        if known is not None and known[0] == version:
            return known[1]
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        with self._lock:
            self._hashes[file] = (version, digest.hexdigest())
        return digest.hexdigest()

    def short_hash(self, checkpoint: Checkpoint) -> Optional[str]:
        full = self.sha256(checkpoint)
        return full[:10] if full else None

    def title(self, checkpoint: Checkpoint) -> str:
        short = self.short_hash(checkpoint)
        return f"{checkpoint.name} [{short}]" if short else checkpoint.name

    def find(self, wanted: Optional[str]) -> Checkpoint:
        """The checkpoint a client means: None or "" is the default model; else a name, a title ("name [hash]"),
        a file name, or a hash (10 digits or the full sha256). UnknownModel lists the names there are."""
        checkpoints = self.checkpoints()
        if not wanted:
            return self.default
        text = wanted.strip()
        if text in checkpoints:
            return checkpoints[text]
        bare = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", text)      # a title: "name [hash]"
        for candidate in (bare, Path(bare).stem, Path(bare).name):
            if candidate in checkpoints:
                return checkpoints[candidate]
        for checkpoint in checkpoints.values():
            if checkpoint.filename == bare:
                return checkpoint
        if re.fullmatch(r"[0-9a-fA-F]{10}|[0-9a-fA-F]{64}", bare):
            for checkpoint in checkpoints.values():
                full = self.sha256(checkpoint)
                if full and full.startswith(bare.lower()):
                    return checkpoint
        raise UnknownModel(wanted, list(checkpoints))
