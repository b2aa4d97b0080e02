# The denoised inference server.
#
# GPU (default): an official CUDA runtime base and PyTorch's CUDA 12.8 build.
#   docker build -t denoised .
#   docker run --gpus all -p 8000:8000 denoised
# CPU: any Debian/Ubuntu base whose python3 is >= 3.11, with PyTorch's CPU build.
#   docker build -t denoised:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Offline: put wheels for torch and every dependency in deploy/docker/wheels/ and add
#   --build-arg PIP_EXTRA_ARGS=--no-index  (pip then reads only that folder).
# Keep BASE_IMAGE's CUDA version and TORCH_INDEX_URL's (cu128 = CUDA 12.8) in step.
#
# Settings come from DENOISED_* environment variables (docs/deployment.md). With no
# DENOISED_MODELS the server serves the default models shipped inside the package; mount model
# directories at /models and set DENOISED_MODELS=/models/<name>[,...] to serve your own.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# Build stage: a virtual environment in /opt/denoised with torch and the dependencies; only
# that folder (and the package wheel) reaches the runtime image.
FROM base AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/denoised
ENV PATH=/opt/denoised/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PIP_EXTRA_ARGS=""
COPY deploy/docker/wheels/ /wheels/
# torch first, from PyTorch's index for the chosen build: a plain PyPI `torch` is a CUDA build
# whatever the base, and this layer stays cached while the sources change.
RUN pip install --find-links /wheels --index-url "$TORCH_INDEX_URL" $PIP_EXTRA_ARGS \
        "torch==$TORCH_VERSION"
# The runtime dependencies as pyproject.toml lists them, as their own cached layer.
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --find-links /wheels $PIP_EXTRA_ARGS -r /tmp/requirements.txt

# The package as a wheel, in its own stage: a source change rebuilds only this small layer and
# the runtime image reuses the large torch + dependencies layer.
FROM build AS package
COPY README.md /src/
COPY kernels /src/kernels
COPY models /src/models
COPY server /src/server
RUN pip wheel --no-deps --find-links /wheels $PIP_EXTRA_ARGS --wheel-dir /dist /src

FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "$UID" denoised \
    && useradd --system --uid "$UID" --gid "$UID" --create-home --home-dir /home/denoised denoised \
    && mkdir -p /models \
    && chown denoised:denoised /models
COPY --from=build /opt/denoised /opt/denoised
ENV PATH=/opt/denoised/bin:$PATH
COPY --from=package /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && denoised --help > /dev/null
ENV HOME=/home/denoised \
    DENOISED_HOST=0.0.0.0 \
    DENOISED_PORT=8000 \
    DENOISED_DEVICE=auto
VOLUME ["/models"]
WORKDIR /home/denoised
USER denoised
EXPOSE 8000
# /health answers while the process is alive; readiness (/ready) is the orchestrator's concern.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DENOISED_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["denoised"]
CMD ["serve"]
