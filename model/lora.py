"""
LoRA adapters, kept beside the weights they adapt (never merged) and applied per sample, so that one batch
may mix requests with different LoRAs, each getting the image it would get alone:

    y = W x  +  sum over the adapters a of this sample   w_a * s_a * B_a (A_a x)

    A_a  lora_down / lora_A   [r, in] (linear) or [r, in, kh, kw] (conv: the layer's own kernel, stride, padding)
    B_a  lora_up / lora_B     [out, r] or [out, r, 1, 1]
    s_a  alpha / r            (kohya's "alpha" tensor; PEFT's lora_alpha from the file's metadata; else 1)
    w_a  the request's weight for the adapter (diffusers' set_adapters(names, weights) combines them so too)

A forward hook on each adapted layer adds the low-rank terms of the rows (samples) that use each adapter:
the batch costs one pass of the base weights plus two thin matmuls per adapter for its rows.

Files (.safetensors; .pt/.ckpt only through torch.load(weights_only=True)):
    kohya / sd-scripts   lora_unet_<module>, lora_te_<module> (lora_te1_ / lora_te2_ for SDXL's two encoders),
                         each with .lora_down.weight, .lora_up.weight [, .alpha]; <module> is the module's path with
                         "_" for "." in diffusers' naming (down_blocks_0_attentions_0_...) or in the original
                         UNet's (input_blocks_4_1_..., as SDXL LoRAs name it)
    diffusers / PEFT     unet.<module>.lora_A.weight / .lora_B.weight, text_encoder[_2].text_model.<module>...;
                         alpha from the "lora_adapter_metadata" the file carries ("unet.lora_alpha", "unet.r",
                         "unet.alpha_pattern", ...), else alpha = rank
"""

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from .weights.files import WeightsError, read_state_dict, some
from .weights.original import unet_key_to_original


class LoRAError(WeightsError):
    """A LoRA file that cannot be used with this model: unreadable, unsafe, or not fitting its layers."""


@dataclass
class Delta:
    """One adapted layer's low-rank term."""
    down: torch.Tensor       # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor         # B: [out, r] or [out, r, 1, 1]
    scale: float             # alpha / r
    conv: Optional[dict]     # the layer's stride and padding, for a conv layer's A; None for a linear layer

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv with stride 1 and no padding: a linear layer on each pixel."""
        return self.conv is not None and self.down.shape[2:] == (1, 1) and tuple(self.conv["stride"]) == (1, 1) \
            and tuple(self.conv["padding"]) == (0, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """B (A x) * scale, for x the layer's input rows."""
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up) * self.scale
        return F.conv2d(F.conv2d(x, self.down, **self.conv), self.up) * self.scale

    def add_to(self, output: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
        """output += weight * B (A x) * scale, in place where it can: the second matmul accumulates straight into
        the layer's output (one pass over it, no term of its size), as the base layer's own GEMM would."""
        alpha = weight * self.scale
        if not output.is_contiguous():                                       # (channels_last outputs)
            return output + self(x) * weight
        if self.conv is None:
            out2 = output.view(-1, output.shape[-1])                          # [M, out]
            out2.addmm_(F.linear(x.reshape(-1, x.shape[-1]), self.down), self.up.t(), alpha=alpha)
        elif self.pointwise:
            B, C = x.shape[:2]
            h = torch.matmul(self.down.flatten(1), x.reshape(B, C, -1))       # [B, r, H*W]
            output.view(B, output.shape[1], -1).add_(torch.matmul(self.up.flatten(1), h), alpha=alpha)
        else:
            output.add_(F.conv2d(F.conv2d(x, self.down, **self.conv), self.up), alpha=alpha)
        return output


@dataclass
class LoRA:
    name: str
    deltas: dict             # "unet.<module path>" / "text_encoder.<...>" / "text_encoder_2.<...>" -> Delta
    file: Path
    sha256: str = ""

    def touches(self, component: str) -> bool:
        return any(path.startswith(component + ".") for path in self.deltas)

# -----------------------------------------------------------------------------
# the layers a LoRA can adapt, and their names in the two file formats


def _layers(model: nn.Module) -> dict:
    """{module path: module} of the linear and conv layers (not embeddings, not norms)."""
    return {path: m for path, m in model.named_modules()
            if path and (hasattr(m, "in_features") or (hasattr(m, "in_channels") and hasattr(m, "kernel_size")))}


def _kohya_names(component: str, model: nn.Module) -> dict:
    """{kohya name: module path} for one component's layers (SDXL's text encoders: lora_te1_ / lora_te2_)."""
    names = {}
    for path in _layers(model):
        flat = path.replace(".", "_")
        if component == "unet":
            names["lora_unet_" + flat] = path
            try:   # the original UNet's naming too (SDXL LoRAs use it)
                original = unet_key_to_original(path + ".weight", model.config).removesuffix(".weight")
                names["lora_unet_" + original.replace(".", "_")] = path
            except KeyError:
                pass
        elif component == "text_encoder":
            names["lora_te_text_model_" + flat] = names["lora_te1_text_model_" + flat] = path
        else:
            names["lora_te2_text_model_" + flat] = path
    return names


def _peft_path(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0....to_q.lora_A.weight' -> ('unet', 'down_blocks.0....to_q'); text encoders'
    paths lose transformers' 'text_model.' level, as our CLIP's module names do."""
    component, _, rest = key.partition(".")
    module = rest.rsplit(".lora_", 1)[0]
    if component.startswith("text_encoder"):
        module = module.removeprefix("text_model.")
    return component, module


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first pattern that matches the end of the module's path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default

# -----------------------------------------------------------------------------
# reading a file


def _metadata(file: Path) -> dict:
    if file.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


def read_lora(file, name: str, models: dict) -> LoRA:
    """
    A LoRA file's deltas for the named models ({"unet": UNet, "text_encoder": CLIPTextModel[, "text_encoder_2"]}),
    checked against them: every key must name a layer the model has, with fitting shapes, else LoRAError naming
    the file and the first keys that do not fit.
    """
    file = Path(file)
    try:
        state = read_state_dict(file)
    except WeightsError as e:
        raise LoRAError(f"LoRA {name!r}: {e}") from e
    if any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raw = _kohya_deltas(state, models)
    elif any(".lora_A." in k or ".lora_B." in k for k in state):
        raw = _peft_deltas(state, models, _metadata(file))
    else:
        raise LoRAError(f"LoRA {name!r}: {file}: not a LoRA: expected kohya keys (lora_unet_*, lora_te_*: "
                        f"lora_down / lora_up) or diffusers / PEFT keys (unet.*.lora_A.weight); found "
                        f"{some(sorted(state), 5)}")
    unknown, wrong, deltas = [], [], {}
    layers = {component: _layers(model) for component, model in models.items()}
    for path, (key, down, up, alpha) in raw.items():
        component, _, module = path.partition(".")
        layer = layers.get(component, {}).get(module)
        if layer is None:
            unknown.append(key)
            continue
        delta = _delta(layer, down, up, alpha)
        if delta is None:
            wrong.append(f"{key} {tuple(down.shape)} / {tuple(up.shape)}")
            continue
        deltas[path] = delta
    problems = ([f"keys for layers this model does not have: {some(unknown, 5)}"] if unknown else []) + \
        ([f"shapes that do not fit the layers: {some(wrong, 5)}"] if wrong else [])
    if problems:
        raise LoRAError(f"LoRA {name!r} ({file}) does not fit this model: " + "; ".join(problems))
    if not deltas:
        raise LoRAError(f"LoRA {name!r}: {file}: holds no LoRA layers")
    return LoRA(name, deltas, file)


def _kohya_deltas(state: dict, models: dict) -> dict:
    """{component.module: (key, down, up, alpha)} of a kohya file."""
    names = {}
    for component, model in models.items():
        names.update({k: f"{component}.{path}" for k, path in _kohya_names(component, model).items()})
    out, loose = {}, []
    for key in state:
        base, _, kind = key.partition(".")
        if kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            loose.append(key)
        elif kind == "lora_down.weight":
            if f"{base}.lora_up.weight" not in state:
                loose.append(key)
                continue
            path = names.get(base, "?." + base)
            alpha = state.get(f"{base}.alpha")
            out[path] = (key, state[key], state[f"{base}.lora_up.weight"],
                         None if alpha is None else float(alpha))
    if loose:
        raise LoRAError(f"unexpected keys (kohya LoRAs hold NAME.lora_down.weight, NAME.lora_up.weight, "
                        f"NAME.alpha): {some(loose, 5)}")
    return out


def _peft_deltas(state: dict, models: dict, metadata: dict) -> dict:
    """{component.module: (key, A, B, alpha)} of a diffusers / PEFT file (alpha from its metadata, else rank)."""
    out, loose = {}, []
    for key in state:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                loose.append(key)
            continue
        up_key = key.replace(".lora_A.", ".lora_B.")
        if up_key not in state:
            loose.append(key)
            continue
        component, module = _peft_path(key)
        if metadata.get(f"{component}.use_dora") or metadata.get(f"{component}.use_rslora"):
            raise LoRAError(f"{component}: DoRA / rsLoRA adapters are not supported")
        down = state[key]
        default = metadata.get(f"{component}.lora_alpha")
        alpha = _pattern_value(metadata.get(f"{component}.alpha_pattern"), module, default)
        out[f"{component}.{module}"] = (key, down, state[up_key], None if alpha is None else float(alpha))
    if loose:
        raise LoRAError(f"unexpected keys (PEFT LoRAs hold MODULE.lora_A.weight and MODULE.lora_B.weight): "
                        f"{some(loose, 5)}")
    return out


def _delta(layer: nn.Module, down: torch.Tensor, up: torch.Tensor, alpha) -> Optional[Delta]:
    """The Delta for one layer, or None when the shapes do not fit it. alpha None: rank (scale 1)."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    down, up = down.float(), up.float()
    if hasattr(layer, "in_features"):
        if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4:   # a 1x1-conv LoRA on a linear layer
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        ok = down.ndim == up.ndim == 2 and down.shape[1] == layer.in_features and \
            up.shape == (layer.out_features, rank)
        return Delta(down, up, scale, None) if ok else None
    kernel = tuple(layer.kernel_size)
    if down.ndim == 2 and up.ndim == 2 and kernel == (1, 1):                  # a linear LoRA on a 1x1 conv
        down, up = down[:, :, None, None], up[:, :, None, None]
    ok = down.ndim == up.ndim == 4 and down.shape[1] == layer.in_channels and tuple(down.shape[2:]) == kernel \
        and tuple(up.shape) == (layer.out_channels, rank, 1, 1)
    conv = {"stride": layer.stride, "padding": layer.padding}
    return Delta(down, up, scale, conv) if ok else None

def file_sha256(file) -> str:
    """The file's SHA-256 (hex); its first 12 characters are the web UI's short hash ("Lora hashes")."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

# -----------------------------------------------------------------------------
# applying them per sample


class _Batch:
    """
    The adapters of each row of the forward calls inside one `active` block, and what is built from them per
    layer, once a block (the sampling loop's steps share it):

      every row the same adapters   each adds B (A x) w_a s_a on the whole batch: no gathering
      rows that differ              a linear (or 1x1 conv) layer stacks each row's adapters along the rank
                                    (weights and scales folded in, zeros where a row has fewer) and adds two
                                    batched matmuls, the second accumulating into the output; another conv
                                    layer adds each adapter's term to its rows (index_add)
    """

    def __init__(self, loras: dict, component: str, per_row: list, device):
        self.loras = loras
        self.sets = [{n: float(w) for n, w in (r or {}).items() if loras[n].touches(component)} for r in per_row]
        self.uniform = self.sets[0] if self.sets and all(r == self.sets[0] for r in self.sets) else None
        self.device = device
        self._stacked: dict = {}               # layer path -> (A_rows, B_rows) or None (no adapter adapts it)
        self._rows: dict = {}                  # adapter name -> (row indices [k], row weights [k])

    def __bool__(self) -> bool:
        return any(self.sets)

    def add(self, path: str, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.uniform is not None:
            for name, weight in self.uniform.items():
                delta = self.loras[name].deltas.get(path)
                if delta is not None:
                    output = delta.add_to(output, x.to(delta.down.dtype), weight)
            return output
        some_delta = next((self.loras[n].deltas[path] for r in self.sets for n in r
                           if path in self.loras[n].deltas), None)
        if some_delta is None:
            return output
        if (some_delta.conv is None or some_delta.pointwise) and output.is_contiguous():
            linear = some_delta.conv is None
            if path not in self._stacked:
                self._stacked[path] = self._stack(path, linear)
            first, second = self._stacked[path]
            B = x.shape[0]
            if linear:   # [B, N, in] @ [B, in, R] -> [B, N, R]; output [B, N, out] += that @ [B, R, out]
                h = torch.bmm(x.to(first.dtype).reshape(B, -1, x.shape[-1]), first)
                output.view(B, -1, output.shape[-1]).baddbmm_(h, second)
            else:        # a 1x1 conv: [B, R, in] @ [B, in, H*W]; output [B, out, H*W] += [B, out, R] @ that
                h = torch.bmm(first, x.to(first.dtype).reshape(B, x.shape[1], -1))
                output.view(B, output.shape[1], -1).baddbmm_(second, h)
            return output
        for name, (rows, weights) in self._adapter_rows().items():
            delta = self.loras[name].deltas.get(path)
            if delta is not None:
                term = delta(x[rows].to(delta.down.dtype))                  # [k, out, ...]
                term = term * weights.to(term.dtype).view(-1, *[1] * (term.ndim - 1))
                output = output.index_add(0, rows, term.to(output.dtype))
        return output

    def _stack(self, path: str, linear: bool):
        """The layer's per-row matrices: (A^T [B, in, R], B^T [B, R, out]) for a linear layer, (A [B, R, in],
        B [B, out, R]) for a 1x1 conv (whose channels come first), contiguous for the batched matmuls."""
        parts = [[(self.loras[n].deltas[path], w) for n, w in r.items() if path in self.loras[n].deltas]
                 for r in self.sets]
        d0 = next(d for row in parts for d, _ in row)
        rank = max(sum(d.down.shape[0] for d, _ in row) for row in parts)
        A = torch.zeros(len(parts), rank, d0.down.shape[1], dtype=d0.down.dtype, device=self.device)
        B = torch.zeros(len(parts), d0.up.shape[0], rank, dtype=d0.up.dtype, device=self.device)
        for i, row in enumerate(parts):
            at = 0
            for d, w in row:
                r = d.down.shape[0]
                A[i, at:at + r] = d.down.reshape(r, -1)                   # (a 1x1 conv's [r, in, 1, 1] too)
                B[i, :, at:at + r] = d.up.reshape(-1, r) * (d.scale * w)
                at += r
        if not linear:
            return A, B
        return A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous()   # [B, in, R], [B, R, out]

    def _adapter_rows(self) -> dict:
        if not self._rows:
            for name in sorted({n for r in self.sets for n in r}):
                index = [i for i, r in enumerate(self.sets) if name in r]
                self._rows[name] = (torch.tensor(index, device=self.device),
                                    torch.tensor([self.sets[i][name] for i in index], device=self.device))
        return self._rows


class Adapters:
    """
    The LoRAs loaded into a pipeline's networks, and the hooks that add them. Nothing runs unless `active`
    says which rows use which adapters: a batch without LoRAs costs one empty check per adapted layer.
    """

    def __init__(self, models: dict):
        self.models = models                   # component name -> network
        self.loras: dict[str, LoRA] = {}
        self._batches: dict[str, Optional[_Batch]] = {}   # component -> the rows of the calls running now
        self._hooked: dict[str, tuple] = {}    # path -> (module it is hooked on, handle)

    def load(self, file, name: Optional[str] = None) -> str:
        name = name or Path(file).stem
        lora = read_lora(file, name, {c: m for c, m in self.models.items() if m is not None})
        lora.sha256 = file_sha256(file)
        for path, delta in lora.deltas.items():       # on each network's device, in its dtype
            like = next(self.models[path.partition(".")[0]].parameters())
            delta.down, delta.up = delta.down.to(like.device, like.dtype), delta.up.to(like.device, like.dtype)
        self.loras[name] = lora
        return name

    def check(self, loras: dict) -> None:
        """ValueError naming any unknown adapter (and the loaded ones) or a bad weight."""
        for name, weight in loras.items():
            if name not in self.loras:
                known = ", ".join(sorted(self.loras)) or "none loaded"
                raise ValueError(f"loras: unknown LoRA {name!r} (loaded: {known})")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not -10 <= weight <= 10:
                raise ValueError(f"loras: the weight of {name!r} must be a number in [-10, 10], got {weight!r}")

    def _hook_all(self) -> None:
        """A forward hook on every layer some loaded adapter adapts (again where a module was replaced, as
        optimize() replaces convolutions)."""
        paths = {p for lora in self.loras.values() for p in lora.deltas}
        for path in paths:
            component, _, module = path.partition(".")
            layer = self.models[component].get_submodule(module)
            hooked = self._hooked.get(path)
            if hooked is None or hooked[0] is not layer:
                if hooked is not None:
                    hooked[1].remove()
                self._hooked[path] = (layer, layer.register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        component = path.partition(".")[0]

        def add_deltas(module, inputs, output):
            batch = self._batches.get(component)
            return None if batch is None else batch.add(path, inputs[0], output)
        return add_deltas

    @contextmanager
    def active(self, component: str, per_row: list):
        """Within this block, the component's layers add each row's adapters: per_row[i] is row i's
        {adapter name: weight} (or an empty dict / None: the base model)."""
        batch = None
        if self.models.get(component) is not None and any(per_row):
            batch = _Batch(self.loras, component, per_row, next(self.models[component].parameters()).device)
            if batch:
                self._hook_all()
            else:
                batch = None
        previous = self._batches.get(component)
        self._batches[component] = batch
        try:
            yield
        finally:
            self._batches[component] = previous
