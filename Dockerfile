# syntax=docker/dockerfile:1
# One image for both roles: the API (`sd serve`, the default command) and the GPU worker (`sd worker`).
#   docker build -t sd-from-scratch .
#   docker run --gpus all -p 8000:8000 sd-from-scratch                # API + in-process worker
#   docker compose -f docker/compose.yaml up --build --scale worker=2   # Redis + API + GPU workers
# PyTorch (with CUDA) comes from the base image; pick another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SD_WEIGHTS=/app/weights \
    SD_HOST=0.0.0.0 \
    SD_PORT=8000

WORKDIR /app

# The dependencies of pyproject.toml except torch, which the base image already has (a second torch is GBs).
RUN pip install --no-cache-dir \
        "numpy>=1.24" "safetensors>=0.4" "pillow>=10" "fastapi>=0.110" "uvicorn>=0.29" \
        "pydantic>=2.6" "python-multipart>=0.0.9" "redis>=5" "pyyaml>=6" "tqdm>=4.66"

COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps .

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
