"""
What every weights layout shares: reading weight files safely, building a model from a config and a
state_dict strictly (exactly the expected keys and shapes, else WeightsError naming the file and the keys),
finding a tokenizer, and the Components a load returns.
"""

import json
import mmap
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from model.clip import CLIPTextModel
from model.tokenizer import CLIPTokenizer, has_tokenizer
from model.unet import UNet
from model.vae import AutoencoderKL


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded: missing, corrupt, unsafe, or not matching the model."""


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet
    scheduler_config: dict      # a diffusers scheduler_config.json dict; {} when the weights carry none
    # SDXL: its second tokenizer and text encoder (OpenCLIP bigG with a projection), and whether an empty
    # negative prompt is zeros rather than the encoded empty string (model_index.json's flag)
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModel | None = None
    force_zeros_for_empty_prompt: bool = False


def some(keys, n=10):
    """At most n keys for an error message, and how many more there are."""
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more

# -----------------------------------------------------------------------------
# reading weight files


def _file_kind(file):
    """'safetensors' or 'torch' from the extension, else from the first bytes; None if neither."""
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "torch"
    with open(file, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":    # zip (torch.save) or a raw pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":                 # safetensors: u64 header length, then JSON
        return "safetensors"
    return None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(file):
    """
    {key: tensor} of a .safetensors file, copied into memory of their own, the file's pages let go of as soon as
    they are copied. Tensors that stay views of a mapped file keep every page they were read from counted in the
    process' memory while any one tensor of the file lives, so weights replaced after loading (prepacked
    convolutions, model/speed.py) would keep their space; copying with the whole file mapped would need twice
    the memory while loading. safe_open checks the header first (offsets inside the file, no gaps or overlaps).
    """
    with safe_open(str(file), framework="pt") as checked, open(file, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:    # private: writes would not reach the file
        header_len = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8:8 + header_len])
        keys = list(checked.keys())
        state, released = {}, 0
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):     # in file order
            info = header[key]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:                                  # rare dtypes (fp8, ...): safetensors' own reader
                state[key] = checked.get_tensor(key).clone()
                continue
            begin, end = (8 + header_len + offset for offset in info["data_offsets"])
            tensor = torch.empty(info["shape"], dtype=dtype)
            if end > begin:    # torch's copy (all threads) from a view of the pages, which are never written
                pages = torch.from_numpy(np.frombuffer(mapped, np.uint8, end - begin, begin))
                tensor.view(-1).view(torch.uint8).copy_(pages)
                del pages      # no view may outlive the mapping
            state[key] = tensor
            copied = end // mmap.PAGESIZE * mmap.PAGESIZE     # pages before this one are not read again
            if copied > released and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED, released, copied - released)   # still in the page cache
                released = copied
    return {key: state[key] for key in keys}


def read_file(file):
    """
    What one weights file holds: {key: CPU tensor} of a .safetensors file, or the object a torch file
    (.ckpt/.pt/.bin) pickles, read with torch.load(weights_only=True): tensors, dicts, lists, strings and
    numbers, never anything whose unpickling could run code (WeightsError instead).
    """
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    kind = _file_kind(file)
    if kind == "safetensors":
        try:
            return _read_safetensors(file)
        except Exception as e:
            raise WeightsError(f"{file}: not a readable .safetensors file (truncated or corrupt?): {e}") from e
    if kind == "torch":
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" in str(e).lower():   # torch's long message; keep its reason
                reason = " ".join(line.strip() for line in str(e).splitlines()[1:]
                                  if line.strip() and not line.startswith(("Please file", "Check the doc")))
                raise WeightsError(f"{file}: refused to unpickle: it holds something other than tensors, "
                                   f"which could run code ({reason}). Use a .safetensors file instead.") from e
            raise WeightsError(f"{file}: not a readable checkpoint: {e}") from e
        except Exception as e:
            raise WeightsError(f"{file}: not a readable checkpoint (truncated or corrupt?): {e}") from e
    raise WeightsError(f"{file}: not a checkpoint (neither a .safetensors nor a torch file)")


def read_state_dict(file):
    """
    All tensors of one weights file as {key: CPU tensor}: .safetensors, or a torch file (.ckpt/.pt/.bin)
    read with torch.load(weights_only=True) and unwrapped from a {"state_dict": ...} checkpoint.
    """
    obj = read_file(file)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise WeightsError(f"{file}: not a checkpoint: expected a dict of tensors (or {{'state_dict': ...}})")
    return obj


def read_json(file):
    try:
        return json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{file}: no such file") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{file}: not a readable JSON file: {e}") from e

# -----------------------------------------------------------------------------
# building a model from a config and a state_dict


def as_dtype(dtype):
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
        return names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not float32, float16 or bfloat16")
    return dtype


def expected_state(cls, config):
    """The state_dict a cls(config) would have, as meta tensors (no memory, no init)."""
    with torch.device("meta"):
        return cls(config).state_dict()


def load_model(cls, config, state, source, device="cpu", dtype=torch.float32, names=None):
    """
    cls(config) holding the tensors of state (native keys), on device in dtype, in eval mode.
    state must have exactly the expected keys and shapes, else WeightsError naming source and the keys
    (as names[key], the key's name in the file, when a names dict is given).
    """
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    name = (lambda k: names.get(k, k)) if names else (lambda k: k)
    problems = []
    missing = [name(k) for k in expected if k not in state]
    if missing:
        problems.append(f"missing keys: {some(missing)}")
    unexpected = [name(k) for k in state if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys: {some(unexpected)}")
    wrong = [f"{name(k)} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        problems.append(f"wrong shapes: {some(wrong)}")
    if problems:
        raise WeightsError(f"{source}: {cls.__name__} weights do not fit its config: " + "; ".join(problems))

    dtype = as_dtype(dtype)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)     # the meta tensors are replaced by these
    if any(t.is_meta for t in model.buffers()):                 # a non-persistent buffer: build it for real
        with torch.device(device):
            model = cls(config).to(dtype)
        model.load_state_dict(state, strict=True)
    return model.eval()


# -----------------------------------------------------------------------------
# tokenizer


def find_tokenizer(tokenizer, folders, source):
    """The tokenizer= argument (a CLIPTokenizer or a folder), else the first folder with vocab.json + merges.txt
    or tokenizer.json."""
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    if tokenizer is not None:
        folders = [Path(tokenizer)]
    for folder in folders:
        if has_tokenizer(folder):
            return CLIPTokenizer.from_dir(folder)
    where = " or ".join(str(f) for f in folders)
    raise WeightsError(f"{source}: no tokenizer: found neither vocab.json + merges.txt nor tokenizer.json in "
                       f"{where}. Pass tokenizer= (a folder with them, e.g. the tokenizer/ folder of "
                       f"stable-diffusion-v1-5, or a CLIPTokenizer)")


def tensors(model):
    """A model's state_dict as contiguous CPU tensors, as safetensors wants them (a meta model's stay meta)."""
    return {k: v.detach().to(v.device if v.is_meta else "cpu").contiguous() for k, v in model.state_dict().items()}

