"""What a request body may be: its Content-Type, uploaded images, checked before anything is decoded
(format and pixel count from the header: 415 / 413), and the size asked for (422), shared by every API face.
The pixel limit is the request's (jobs.MaxPixels: it follows the model that runs it), passed in."""

import io
import re
import struct

from fastapi import Depends, HTTPException, Request, UploadFile

from .settings import Settings


def require_content_type(*allowed: str):
    """A dependency: 415 unless the body is sent as one of `allowed` (a wrong one would only show up
    later as a confusing "field is required")."""
    def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given not in allowed:
            raise HTTPException(415, f"Content-Type must be {' or '.join(allowed)}, got {given or 'none'}")
    return Depends(check)


JSON_BODY = require_content_type("application/json")
FORM_BODY = require_content_type("multipart/form-data", "application/x-www-form-urlencoded")  # (urlencoded: no file)


async def read_image(upload: UploadFile, what: str, settings: Settings, max_pixels: int):
    """The upload's bytes and its opened (header-only) image; 413/415 before any pixel is decoded."""
    return open_image(await upload.read(), what, settings, max_pixels)


# the formats an upload may be: PIL reads dozens more (EPS would even run Ghostscript); none is needed
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def open_image(data: bytes, what: str, settings: Settings, max_pixels: int):
    """read_image for bytes already in hand (the compatibility APIs' base64 images)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{what} is {len(data)} bytes; at most {settings.max_upload_bytes} are accepted")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # a header declaring billions of pixels: PIL refuses it unread
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise HTTPException(413, f"{what} declares {declared[1] if declared else 'too many'} pixels; "
                                 f"at most {max_pixels} are accepted")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        raise HTTPException(415, f"{what} is not an image this server reads (PNG, JPEG, WebP, BMP, GIF)")
    if image.width * image.height > max_pixels:
        raise HTTPException(413, f"{what} is {image.width}x{image.height} = {image.width * image.height} pixels; "
                                 f"at most {max_pixels} are accepted")
    try:
        image.load()
    except Exception:  # noqa: BLE001  (truncated or corrupt data)
        raise HTTPException(415, f"{what} is a damaged {image.format} file")
    return data, image


def check_pixels(width, height, max_pixels: int, what: str = "width * height") -> None:
    """422 when the size asked for is over the pixel limit. (Not in the request models: the limit is the
    model's, which a worker announces while the app runs, so it is checked per request.)"""
    if width and height and width * height > max_pixels:
        raise HTTPException(422, f"{what} must be at most {max_pixels}, got {width}x{height} = {width * height}")


def size_from_image(params: dict, image, max_pixels: int) -> dict:
    """Default width/height of img2img and inpaint: the uploaded image's, rounded down to 8."""
    width = params["width"] or image.width // 8 * 8
    height = params["height"] or image.height // 8 * 8
    if width < 8 or height < 8:
        raise HTTPException(422, f"image must be at least 8x8 pixels, got {image.width}x{image.height}")
    check_pixels(width, height, max_pixels)
    return {**params, "width": width, "height": height}
