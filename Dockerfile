# One image for every shardwire role: gateway, shard (any rank), up, probe and the
# client commands. The command picks the role:
#   docker run --rm -p 50051:50051 shardwire up --host 0.0.0.0
#   docker run --rm shardwire shard --host 0.0.0.0 --model /models/NAME
#
# CPU PyTorch: the engine computes on the CPU. BASE_IMAGE and TORCH_INDEX_URL pick
# another base image or wheel index (a mirror, say).
# A base without Python 3.11+ gets the distribution's python3 (Debian or Ubuntu bases).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/shardwire \
    PATH=/opt/shardwire/bin:$PATH

RUN set -eux; \
    if ! python3 -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv python3-pip ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    pip install --upgrade pip

# torch first, from the chosen wheel index, so the package resolves against it and
# this heavy layer stays cached while the source changes.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

WORKDIR /opt/shardwire-src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY clients ./clients
COPY serve ./serve
RUN pip install ".[server]" && shardwire --help >/dev/null

# A non-root user; models are read from the /models volume.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/shardwire shardwire \
    && mkdir -p /models \
    && chown shardwire:shardwire /models
USER shardwire
WORKDIR /home/shardwire
VOLUME ["/models"]

# gateway gRPC, shard gRPC (leader), TP rendezvous (MASTER_PORT), /metrics.
EXPOSE 50051 50061 29500 9100

ENTRYPOINT ["shardwire"]
CMD ["up", "--host", "0.0.0.0", "--port", "50051"]
