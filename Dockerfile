# The bridge's image: one image for every command (`run`, `ingress`, `consume subscriptions`,
# `consume traces`, `migrate`, `fake-edrone`, ...); docker-compose.yml runs each as a service.
# Needs BuildKit (the default builder since Docker 23) for the wheel mount below; its built-in
# Dockerfile front-end is enough (no `# syntax=` line: that would fetch one from a registry).
# The base is pinned by version; pin it by digest too where your registry answers:
#   docker buildx imagetools inspect python:3.11.7-slim-bookworm   (then PYTHON_IMAGE=...@sha256:...)

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# --- builder: the bridge and every dependency as wheels ----------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the package is built from: no tests, benchmarks or CI files (see .dockerignore too).
COPY pyproject.toml README.md ./
COPY requirements/lock.txt ./requirements/lock.txt
COPY bridge ./bridge
COPY consumers ./consumers
COPY schemas ./schemas
# Every dependency ships binary wheels for CPython 3.11 on amd64 and arm64, so no compiler is
# needed even here; should one ever not, install build-essential in this stage only.
# The locked versions: the image holds what CI tested.
RUN pip wheel --wheel-dir /wheels -c requirements/lock.txt .

# --- the image: the installed wheels, a non-root user, nothing to build with -------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The wheels are mounted for the install only, so they take no layer of the image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels edrone-bridge \
    && groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin bridge
COPY --chmod=755 deploy/healthcheck.py /usr/local/bin/bridge-healthcheck

# Numeric, so that orchestrators can verify runAsNonRoot.
USER 10001:10001
# 8080: the ingress (`run`, `ingress`); 9100: /metrics, /healthz, /readyz of a `consume` process.
EXPOSE 8080 9100
# Liveness of `run` and `ingress`; docker-compose.yml points the consumers at 9100. /healthz,
# not /readyz: a broker outage is waited out by the process (it reconnects), not by a restart.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bridge-healthcheck"]
# SIGTERM drains: the ingress answers 503 to new webhooks and finishes the ones in flight, the
# consumers commit and ack their batch in hand, within shutdown_timeout_s / drain_timeout_s
# (10 s each), below the 30 s stop_grace_period of docker-compose.yml.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edrone-bridge"]
CMD ["run"]
