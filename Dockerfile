# The production image of ingest-buffer: the buffer and its Python dependencies in a venv, talking to
# ClickHouse servers over HTTP(S). It carries no embedded engine (the `chdb` extra, ~550 MB), so a
# chdb:// URL does not work here.
#
#   docker build -t ingest-buffer .
#   docker run --read-only -v ingest-buffer:/var/lib/ingest-buffer \
#     -e INGEST_BUFFER_CLICKHOUSE_URL=http://user:pass@clickhouse:8123/db ingest-buffer
#
# The base image is a build argument so that a mirror or a pinned digest can replace it; both stages
# use it, because the venv's interpreter is a link to the base image's python3.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/ingest-buffer

WORKDIR /src
COPY pyproject.toml README.md ./
COPY buffer ./buffer
# The server, not `.[chdb]`: the production image talks to a ClickHouse server and must stay small. pip and
# setuptools are only needed to install, so they do not go into the final stage.
RUN /opt/ingest-buffer/bin/pip install --no-cache-dir '.[server]' \
    && /opt/ingest-buffer/bin/pip uninstall --yes pip setuptools \
    && /opt/ingest-buffer/bin/ingest-buffer --version


FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="ingest-buffer" \
      org.opencontainers.image.description="A gRPC sidecar that buffers rows and writes them to ClickHouse in large batches" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric non-root user (runAsNonRoot can check it), and the only writable path of the image: the
# dead-letter store. Everything else may be mounted read-only (readOnlyRootFilesystem: true).
RUN groupadd --gid 10001 ingest \
    && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin ingest \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/ingest-buffer /var/lib/ingest-buffer/dead-letters \
       /var/lib/ingest-buffer/wal

COPY --from=build /opt/ingest-buffer /opt/ingest-buffer

ENV PATH=/opt/ingest-buffer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INGEST_BUFFER_GRPC_LISTEN=0.0.0.0:50051 \
    INGEST_BUFFER_HTTP_LISTEN=0.0.0.0:8481 \
    INGEST_BUFFER_DEAD_LETTER_DIR=/var/lib/ingest-buffer/dead-letters \
    INGEST_BUFFER_WAL_DIR=/var/lib/ingest-buffer/wal \
    INGEST_BUFFER_LOG_FORMAT=json

VOLUME ["/var/lib/ingest-buffer"]
WORKDIR /var/lib/ingest-buffer
USER 10001:10001

# 50051: gRPC (IngestService, grpc.health.v1, reflection); 8481: /livez, /readyz, /drain, /metrics.
EXPOSE 50051 8481

# SIGTERM starts the drain; exit 0 when every accepted row reached ClickHouse, 3 when some did not.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ingest-buffer"]
CMD ["serve"]
