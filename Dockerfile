# evit-serve container image (multi-stage; the runtime stage holds the venv and nothing else of the build).
#
#   CPU (default):  docker build -t evit-serve:cpu .
#   CUDA:           docker build --build-arg VARIANT=cuda -t evit-serve:cuda .
#
# Model weights are never baked in: mount a directory read-only at /models and pass
# `--checkpoint /models/<file>` (or EVIT_CHECKPOINT=/models/<file>), or let the service fetch hub weights into the /cache volume.
# Build-time knobs (all optional): TORCH_INDEX_URL (where torch comes from: `auto` = torch's CPU
# wheel index for VARIANT=cpu, about 200 MB instead of PyPI's several-GB CUDA build, and PyPI for cuda;
# empty = PyPI),
# PIP_EXTRA_INDEX_URL (a local wheel mirror), and a build secret `pip_ca`
# (a CA bundle for pip behind a TLS-intercepting proxy; used for the build only, never stored).

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---- one base per variant; `FROM base-${VARIANT}` below picks one, the other is never built ----
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# The CUDA base brings the NVIDIA runtime hooks and env (NVIDIA_VISIBLE_DEVICES, driver checks);
# PyPI's torch wheel brings its own CUDA libraries, so only Python is added here. The distribution's
# python3 is pinned by the base image tag, hence no per-package version pins (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A stage name, not an image: the tags are pinned above (DL3006 cannot see that).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- builder: a venv with torch (own layer, cached across source edits), the deps, then the project ----
FROM base AS builder
ARG VARIANT
ARG TORCH_INDEX_URL=auto
ARG PIP_EXTRA_INDEX_URL=""
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# The torch/torchvision pins and the other runtime deps are read from pyproject.toml (one source of truth).
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    python3 -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
open("/tmp/torch.txt", "w").write("\n".join(r for r in d if r.split("=")[0] in ("torch", "torchvision"))); \
open("/tmp/deps.txt", "w").write("\n".join(d))'; \
    index="${TORCH_INDEX_URL}"; \
    if [ "${index}" = auto ]; then \
        if [ "${VARIANT}" = cpu ]; then index=https://download.pytorch.org/whl/cpu; else index=""; fi; \
    fi; \
    if [ -n "${index}" ]; then \
        pip install --index-url "${index}" --extra-index-url https://pypi.org/simple -r /tmp/torch.txt; \
    else \
        pip install -r /tmp/torch.txt; \
    fi; \
    pip install -r /tmp/deps.txt
COPY README.md ./
COPY evit ./evit
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -z "${PIP_EXTRA_INDEX_URL}" ]; then unset PIP_EXTRA_INDEX_URL; fi; \
    pip install --no-deps . \
 && pip check \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---- runtime: non-root, no compiler, no pip cache, no source tree ----
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="evit-serve" \
      org.opencontainers.image.description="Token-pruned (EViT) Vision Transformers over HTTP, keep rate per request" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.evit-serve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 evit \
 && useradd --system --uid 10001 --gid evit --home-dir /home/evit --create-home --shell /usr/sbin/nologin evit \
 && mkdir -p /models /cache \
 && chown evit:evit /cache
COPY --from=builder /opt/venv /opt/venv
# Passes run as `make serve` runs them (EVIT_BACKEND=auto: OpenVINO fp32 graphs on a CPU, torch on CUDA;
# docs/backends.md); the compiled graphs are cached under $XDG_CACHE_HOME/evit-serve/graphs, on the /cache
# volume, so a restart with the same model and options skips the export. EVIT_BACKEND=torch: eager passes.
ENV PATH=/opt/venv/bin:$PATH \
    EVIT_HOST=0.0.0.0 \
    EVIT_PORT=8000 \
    EVIT_BACKEND=auto \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    XDG_CACHE_HOME=/cache
VOLUME ["/cache"]
USER 10001:10001
WORKDIR /home/evit
EXPOSE 8000
# Liveness only (the process answers); readiness (/readyz) is for orchestrators to route traffic.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EVIT_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
# Configure with EVIT_* environment variables (EVIT_MODEL, EVIT_CHECKPOINT, EVIT_DEVICE, EVIT_BACKEND, ...) or with flags
# after the image name; the default model is the service's own (DeiT-S, hub weights).
ENTRYPOINT ["evit-serve"]
CMD []
