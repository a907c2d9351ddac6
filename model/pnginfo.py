"""PNG files that remember how they were made.

Every image this project writes carries its generation parameters in a PNG
`parameters` text chunk, in the one-line-per-field format AUTOMATIC1111 made
common, so tools that read that chunk (and people) can make the image again:

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: default
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image, PngImagePlugin

from .prompts import extract_lora_tags

# Field order of the last line, and the label each key is written under.
_LABELS = {
    "steps": "Steps",
    "sampler": "Sampler",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "strength": "Denoising strength",
    "mode": "Mode",
    "model": "Model",
    "lora_hashes": "Lora hashes",
}


def infotext(params: dict) -> str:
    """Render generation parameters as the `parameters` chunk text."""
    prompt = str(params.get("prompt", ""))  # as the user wrote it: emphasis, BREAK and <lora:...> tags included
    # loras: {name: (weight, sha256)}, all that was applied. As the web UI writes them, they are tags in the prompt:
    # the prompt's own, plus one for what they do not say (a loras= weight, added to a tag of the same name), so
    # that the text, parsed again, applies the same weights.
    loras = params.get("loras") or {}
    try:
        written = extract_lora_tags(prompt)[1]
    except ValueError:
        written = {}
    tags = [f"<lora:{name}:{weight - written.get(name, 0.0):g}>" for name, (weight, _) in loras.items()
            if weight != written.get(name, 0.0)]
    lines = [" ".join([prompt, *tags]) if prompt else " ".join(tags)]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = dict(params)
    if "width" in fields and "height" in fields:
        fields["size"] = f"{fields['width']}x{fields['height']}"
    if loras:
        fields["lora_hashes"] = '"' + ", ".join(f"{name}: {sha[:12]}" for name, (_, sha) in loras.items()) + '"'
    lines.append(", ".join(f"{label}: {fields[key]}" for key, label in _LABELS.items() if fields.get(key) is not None))
    return "\n".join(lines)


def png_bytes(image: Image.Image, params: dict | None = None) -> bytes:
    """Encode `image` as PNG, with `params` in a `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text("parameters", infotext(params))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_parameters(data: bytes | str) -> str | None:
    """The `parameters` chunk of a PNG (bytes or a path), or None."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        return img.text.get("parameters") if hasattr(img, "text") else None


_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """A `parameters` chunk (this project's or the web UI's) as a dict: "Prompt", "Negative prompt", and each
    "Label: value" of its last line (quoted values unquoted; numbers stay text, as the web UI's reader keeps
    them where it does not know the label). Lines before "Negative prompt:" are the prompt; a last line with
    fewer than three fields is part of the text, not settings."""
    lines = text.strip().split("\n")
    fields: dict = {}
    last = lines[-1] if lines else ""
    found = list(_FIELD.finditer(last))
    if len(found) >= 3 and "".join(m.group(0) for m in found).strip() == last.strip():
        lines = lines[:-1]
        for m in found:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = json.loads(value) if _is_json_string(value) else value[1:-1]
            fields[m.group(1).strip()] = value
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip(), **fields}


def _is_json_string(value: str) -> bool:
    try:
        return isinstance(json.loads(value), str)
    except ValueError:
        return False
