"""Errors every API face shares: the documented error answers (for the OpenAPI schema) and the sentences
that name a field and what it accepts. Each face answers in its own shape (native and web UI
`{"detail": ...}`, OpenAI `{"error": {...}}`) with these messages."""

from . import schemas

RETRY_AFTER = "5"  # seconds, for 429 and 503
ERRORS = {  # documented error answers
    400: {"model": schemas.Error, "description": "the body could not be parsed (JSON that is not UTF-8, broken "
                                                 "multipart data)"},
    401: {"model": schemas.Error, "description": "missing or wrong API key (when keys are configured)"},
    413: {"model": schemas.Error, "description": "request body or image too large"},
    415: {"model": schemas.Error, "description": "the upload is not an image (PNG, JPEG, WebP, BMP, GIF), or the "
                                                 "body's Content-Type is not the endpoint's"},
    422: {"model": schemas.Error, "description": "a field is out of range; the message names it and the range"},
    429: {"model": schemas.Error, "description": "queue full; retry after the Retry-After seconds"},
    503: {"model": schemas.Error, "description": "queue unreachable; retry after the Retry-After seconds"},
}
SYNC_ERRORS = {**ERRORS, 409: {"model": schemas.Error, "description": "the job was cancelled"},
               504: {"model": schemas.Error, "description": "the job did not finish in time; poll /jobs/{id}"}}
PNG_OR_JSON = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "one PNG (headers X-Seed, X-Job-Id), or JSON for several images or "
                                    "with `Accept: application/json`"}}


def clear_detail(exc) -> str:
    """An HTTPException's detail; FastAPI's own for a body it could not parse, made to say what to send."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return "the body could not be parsed: JSON must be UTF-8 text, a form valid multipart/form-data"
    return str(exc.detail)


def shown(value, limit: int = 60) -> str:
    """A rejected value as the error quotes it: long text cut, so a 10,000-character prompt is not echoed back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} bytes" if isinstance(value, bytes) else f"{len(value)} characters" \
        if isinstance(value, str) else "cut"
    return f"{text[:limit]}... ({size})"


def field_rules(*models) -> dict[str, str]:
    """field name -> what it accepts, from the first sentence of each field's description in the pydantic
    `models` (the sentences error_message ends with)."""
    return {name: f.description.split(";")[0] for m in models for name, f in m.model_fields.items() if f.description}


def error_message(err: dict, rules: dict[str, str]) -> str:
    """One pydantic error as a sentence naming the field and what it accepts."""
    kind = err.get("type", "")
    if kind == "json_invalid":  # loc is ("body", character offset)
        return f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')} " \
               f"(at character {err['loc'][-1]})"
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
    name = ".".join(loc) or "body"
    given = f", got {shown(err['input'])}" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return f"the body must be a JSON object with the fields {', '.join(rules)}{given}"
    if kind == "string_unicode":
        return f"{name} must be valid Unicode text (no lone surrogates)"
    if kind == "missing":
        if loc:
            return f"{name} is required"
        return f"the body is required: a JSON object with the fields {', '.join(rules)}"
    if kind == "extra_forbidden" and len(loc) > 1 and loc[0] in rules:  # inside a field ("loras.0.weight")
        return f"{name} is not a field: {loc[0]} must be {rules[loc[0]]}"
    if kind == "extra_forbidden":
        return f"{name} is not a field of this request (fields: {', '.join(rules)})"
    if kind == "value_error" and not loc:  # a model validator (width * height)
        return err["msg"].removeprefix("Value error, ")
    if name in rules:
        return f"{name} must be {rules[name]}{given}"
    if loc and loc[0] in rules:  # an item of a list field ("original_size.0"): the field's rule
        return f"{loc[0]} must be {rules[loc[0]]} ({name}{given})"
    return f"{name}: {err.get('msg', 'invalid')}{given}"
