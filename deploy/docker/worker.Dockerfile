# syntax=docker/dockerfile:1
# HAM GPU worker image: CUDA runtime + torch CUDA build + the engine. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t ham-worker:0.1.0 .
# CPU-only variant (the compose cpu override, laptops, CI smoke runs):
#   docker build -f deploy/docker/worker.Dockerfile --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ham-worker:0.1.0-cpu .
# Bases are pinned by tag; the CUDA minor must match the torch wheel index (cu128 ↔ CUDA 12.8).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Empty: the newest torch on that index; set e.g. --build-arg TORCH_VERSION=2.9.1 for a reproducible build.
ARG TORCH_VERSION=

# --- build: a venv with torch and the engine extras ------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/ham
ENV PATH=/opt/ham/bin:$PATH
# torch from the CUDA wheel index first, so `.[engine]` finds it satisfied and never pulls a
# CPU build from PyPI.
RUN pip install "torch${TORCH_VERSION:+==${TORCH_VERSION}}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ham_engine ./ham_engine
COPY ham_core ./ham_core
COPY service ./service
COPY worker ./worker
COPY ham_cli ./ham_cli
RUN pip install ".[engine]" && python -c "import torch, diffusers, worker, ham_engine"

# --- runtime ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
LABEL org.opencontainers.image.title="ham-worker" \
      org.opencontainers.image.description="HAM style transfer GPU worker" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ham \
    && useradd --system --uid 10001 --gid ham --home-dir /home/ham --create-home --shell /usr/sbin/nologin ham \
    && mkdir -p /models && chown ham:ham /models
COPY --from=build /opt/ham /opt/ham
# The worker never downloads weights at run time: the model is pre-downloaded into the
# HF_HOME volume (or mounted as a folder) and HAM_MODEL names it. See docs/deploy.md.
ENV PATH=/opt/ham/bin:$PATH \
    HAM_WORKER_METRICS_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HAM_MODEL=tiny \
    HAM_WORKER_METRICS_PORT=9100 \
    HAM_LOG_LEVEL=INFO
VOLUME ["/models"]
WORKDIR /home/ham
USER 10001:10001
EXPOSE 9100
# Ready once the model is loaded and the worker listens on the queue (served on the metrics port).
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('HAM_WORKER_METRICS_PORT', '9100'), timeout=2)"]
# SIGTERM → warm shutdown: the running job finishes, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ham"]
CMD ["worker"]
