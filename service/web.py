"""The web page at `/`: plain HTML, CSS and JavaScript in service/static/, no build step, nothing
fetched from elsewhere. The page speaks the native job API like any other client (POST /jobs/{mode},
then GET /jobs/{id} for progress and the PNGs), so it needs nothing here but its files and the
few facts it cannot read from that API: the samplers, the limits, and whether a key is required.

    GET /             the page
    GET /ui/config    {samplers, max_steps, max_images, max_pixels, max_side, native_size, api_key_required}
    GET /ui/{file}    its script and style sheet
"""

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from model.samplers import SAMPLERS

from . import schemas
from .jobs import MaxPixels
from .settings import Settings

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI, settings: Settings) -> None:
    """Add the page's routes to `app`. They need no API key: the page asks for one when the API does."""

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/ui/config", include_in_schema=False)
    async def config(request: Request, max_pixels: MaxPixels):
        model = await request.app.state.served.default()  # as a worker announced it, once one has
        return {"samplers": list(SAMPLERS), "max_steps": settings.max_steps, "max_images": settings.max_images,
                "max_pixels": max_pixels, "max_side": schemas.MAX_SIDE,  # the limit a request gets now
                "native_size": model.native_size if model is not None else None,
                "api_key_required": bool(settings.api_keys)}

    # after /ui/config, which the mount would otherwise shadow
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
