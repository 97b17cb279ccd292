# The bridge as a container: `docker compose up` runs `edrone-bridge run` from this image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY consumers ./consumers
COPY schemas ./schemas
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home bridge

USER bridge
EXPOSE 8080
# SIGTERM drains (in-flight webhooks finish, held batches commit) within the stop grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edrone-bridge"]
CMD ["run"]
