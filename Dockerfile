# syntax=docker/dockerfile:1
#
# The hmem server image: a builder stage that installs the package into a virtualenv, and a slim
# runtime stage that copies that virtualenv and runs `hmem serve` as an unprivileged user.
#
#   docker build -t hmem .
#   docker run -p 127.0.0.1:8000:8000 -v hmem-data:/data hmem
#   docker build --build-arg HMEM_EXTRAS=cluster -t hmem:cluster .    # with Ray Serve
#
# With no settings it serves the packaged demo bank: level 1 on LMDB and the deepest level on
# disk under /data, or on S3 when HMEM_CLOUD_ENDPOINT is set (docker-compose.yml, docs/deploy.md).
# The structure of this file is checked by tests/test_deploy.py.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned, in its own layer: the pin keeps the several GB of CUDA packages that an
# unpinned resolve pulls out of the image (docs/machines.md), and the layer stays cached while the
# code changes. Keep it equal to the pin in pyproject.toml (the test checks).
RUN pip install torch==2.13.0

# Extras of pyproject.toml installed with the package, comma-separated: `cluster` adds Ray Serve
# for `hmem serve --replicas` (docker-compose.yml's cluster profile builds hmem:cluster with it).
# Empty by default: Ray and its dependencies add about 340 MB in some 50 packages, a third more
# virtualenv, that a single server never imports, and Ray's own services are attack surface
# that an image without them does not have. One Dockerfile still builds both images: declared
# after the torch layer, the argument leaves that layer cached and shared between the two.
ARG HMEM_EXTRAS=""

# Only what `pip install .` reads: the metadata, the readme it names, and the two packages.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY tiers/ tiers/
# `.` alone when HMEM_EXTRAS is empty (pip refuses `.[]`), `.[cluster]` when it is `cluster`.
RUN pip install ".${HMEM_EXTRAS:+[$HMEM_EXTRAS]}"


FROM python:3.11-slim AS runtime

# MALLOC_*: glibc would hand every freed multi-MB buffer back to the OS; raising both thresholds
# keeps them in the process and makes loading safetensors blocks about 10x faster (docs/machines.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HMEM_DATA_DIR=/data \
    MALLOC_MMAP_THRESHOLD_=1073741824 \
    MALLOC_TRIM_THRESHOLD_=1073741824

# A fixed, numeric uid so that volume ownership and Kubernetes' runAsNonRoot check can rely on it.
# /data is created and owned here so that a fresh named volume mounted on it inherits the owner.
RUN groupadd --system --gid 10001 hmem \
 && useradd --system --uid 10001 --gid hmem --create-home --home-dir /home/hmem \
        --shell /usr/sbin/nologin hmem \
 && mkdir -p /data \
 && chown hmem:hmem /data

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/hmem
# State: the LMDB and disk tiers of the default placement, and the persisted blocklist.
VOLUME ["/data"]

EXPOSE 8000

# Liveness only (the process answers); readiness is GET /ready, used by docker-compose.yml.
# Python's urllib because slim images have no curl; it exits non-zero on any non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Exec form: hmem is PID 1 and receives SIGTERM itself, so `docker stop` shuts it down cleanly.
CMD ["hmem", "serve", "--host", "0.0.0.0", "--port", "8000"]
