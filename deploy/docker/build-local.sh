#!/usr/bin/env bash
# Build the image on a machine that reaches the Debian and PyPI mirrors but no image registry
# (no Docker Hub, no ghcr.io), as this project's CI machines do:
#
#  1. a Debian bookworm root with python3.11 made by debootstrap, imported as BASE_IMAGE
#     (Debian's python3.11 is the Python the project pins);
#  2. the host's uv binary imported as UV_IMAGE (the same version ghcr.io/astral-sh/uv serves);
#  3. `docker build` of the repository's Dockerfile with those two, the host's CA bundle as the
#     build secret `ca` (for a TLS-inspecting proxy) and the proxy variables passed through.
#
#   deploy/docker/build-local.sh [TAG] [extra docker build arguments...]
#   TORCH_VARIANT=cuda deploy/docker/build-local.sh emb-model-provider:cuda
#
# Needs root (debootstrap), debootstrap, a running dockerd and a docker client with BuildKit
# (Docker >= 23, or the 20.10 client with DOCKER_BUILDKIT=1, which this script sets). On a bare
# Debian machine: `apt-get install -y docker.io debootstrap`, `dockerd >/tmp/dockerd.log 2>&1 &`
# (overlay2, no extra flags, worked on the project's build machine), then
# `DOCKER=/usr/bin/docker deploy/docker/build-local.sh` if another, buildx-less client is first
# on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${1:-emb-model-provider:local}
shift || true
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=${BASE_IMAGE:-local/debian-python:3.11-$SUITE}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WORK=${WORK:-${TMPDIR:-/tmp}/emb-provider-docker}
DOCKER=${DOCKER:-docker}
export DOCKER_BUILDKIT=1

# The real uv binary (pyenv and similar put a shell shim first on PATH).
UV_BIN=${UV_BIN:-$(command -v uv)}
if [ "$(head -c 4 "$UV_BIN" | od -An -c | tr -d ' ')" != '177ELF' ] && command -v pyenv >/dev/null; then
  UV_BIN=$(pyenv which uv)
fi
UV_VERSION=$("$UV_BIN" --version | awk '{print $2}')
UV_IMAGE=${UV_IMAGE:-local/uv:$UV_VERSION}

mkdir -p "$WORK"

if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "== debootstrap $SUITE with python3.11 -> $BASE_IMAGE"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3.11,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR"
  # Documentation, man pages, locales and apt's package lists are of no use in the image.
  tar -C "$WORK/rootfs" \
      --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/locale \
      --exclude='./var/lib/apt/lists/*' --exclude='./var/cache/apt/*' -c . \
    | $DOCKER import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
  rm -rf "$WORK/rootfs"
fi

if ! $DOCKER image inspect "$UV_IMAGE" >/dev/null 2>&1; then
  echo "== $UV_BIN -> $UV_IMAGE"
  rm -rf "$WORK/uv" && mkdir -p "$WORK/uv"
  cp "$UV_BIN" "$WORK/uv/uv"
  tar -C "$WORK/uv" -c . | $DOCKER import - "$UV_IMAGE"
fi

secret=()
if [ -s "$CA_BUNDLE" ]; then secret=(--secret "id=ca,src=$CA_BUNDLE"); fi
proxies=()
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  if [ -n "${!var:-}" ]; then proxies+=(--build-arg "$var"); fi
done

echo "== docker build $TAG (TORCH_VARIANT=$TORCH_VARIANT, base $BASE_IMAGE, uv $UV_IMAGE)"
start=$(date +%s)
$DOCKER build \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "UV_IMAGE=$UV_IMAGE" \
  --build-arg "TORCH_VARIANT=$TORCH_VARIANT" \
  --build-arg "TORCH_INDEX=$TORCH_INDEX" \
  "${secret[@]}" "${proxies[@]}" \
  -t "$TAG" "$@" .
echo "== built $TAG in $(( $(date +%s) - start )) s"
$DOCKER image ls "$TAG"
