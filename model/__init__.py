"""Stable Diffusion from scratch. `from model import StableDiffusion` is the entry point."""


def __getattr__(name):  # lazy, so `import model.data` does not load the whole pipeline
    if name in ("StableDiffusion", "Request", "Cancelled"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["StableDiffusion", "Request", "Cancelled"]
