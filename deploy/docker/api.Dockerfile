# syntax=docker/dockerfile:1
# HAM API image: FastAPI front end, no torch. Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t ham-api:0.1.0 .
# The base is pinned by tag; bump it deliberately (and rebuild) for security fixes.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: install the package into a venv that the runtime stage copies whole -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/ham
ENV PATH=/opt/ham/bin:$PATH
WORKDIR /src
# Dependencies first, so a code-only change reuses the cached dependency layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY ham_engine ./ham_engine
COPY ham_core ./ham_core
COPY service ./service
COPY worker ./worker
COPY ham_cli ./ham_cli
# Base install only: the API never imports torch (ham_engine.params is torch-free).
RUN pip install --no-deps . && python -c "import ham_core.config, ham_engine.params"

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ham-api" \
      org.opencontainers.image.description="HAM style transfer HTTP API (no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 ham \
    && useradd --system --uid 10001 --gid ham --home-dir /home/ham --create-home --shell /usr/sbin/nologin ham
COPY --from=build /opt/ham /opt/ham
ENV PATH=/opt/ham/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HAM_LOG_LEVEL=INFO
WORKDIR /home/ham
USER 10001:10001
EXPOSE 8000
# Liveness only: /readyz also checks Redis and storage, which compose and Kubernetes probe separately.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["ham"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
