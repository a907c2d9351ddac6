# syntax=docker/dockerfile:1
# One image for both roles: the API (`sd serve`, the default command) and the GPU worker (`sd worker`).
#   docker build -t sd-from-scratch .
#   docker run --gpus all -p 8000:8000 sd-from-scratch                # API + in-process worker
#   docker compose -f docker/compose.yaml up --build --scale worker=2   # Redis + API + GPU workers
# Python as the tests run it; PyTorch is installed below at the version pyproject.toml pins and the tests run on.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SD_WEIGHTS=/app/weights \
    SD_HOST=0.0.0.0 \
    SD_PORT=8000

WORKDIR /app

# torch first, in a layer of its own (GBs that a code change should not download again), pinned as in
# pyproject.toml (a test keeps the two equal). On x86_64 Linux PyPI's torch wheel is the CUDA build, CUDA's
# libraries coming as nvidia-* wheels: the host needs only its driver (docker run --gpus all).
RUN pip install --no-cache-dir "torch==2.13.0"

# The package with the rest of its runtime dependencies (torch already satisfies its pin: nothing more of it).
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
RUN pip install --no-cache-dir .

# The default model is baked in; to use other weights mount them and point SD_WEIGHTS at them
# (docker run -v /data/sd15:/weights:ro -e SD_WEIGHTS=/weights ...).
COPY weights/ weights/

RUN useradd --create-home --uid 10001 --user-group sd
USER 10001:10001

EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SD_PORT', '8000'), timeout=4)"]

CMD ["sd", "serve"]
