# The relay as a sidecar container. Build:   docker build -t webhook-relay .
# Run (see docs/docker.md):
#   docker run -p 8000:8000 -v relay-data:/data \
#     -v $PWD/relay.toml:/etc/relay/relay.toml:ro -e STRIPE_WEBHOOK_SECRET=... webhook-relay

# --- build: the project as a wheel, installed with its dependencies into a virtualenv -------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay/ relay/
# The wheel ships the default mappings as relay/defaults (see pyproject.toml).
COPY mappings/ mappings/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install "$(ls /dist/*.whl)[postgres]"

# --- final: the virtualenv and the mappings; no compilers, no build tools, not root ---------
FROM python:3.11-slim

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_CONFIG=/etc/relay/relay.toml \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8000

RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /data relay \
 && mkdir -p /data /etc/relay \
 && chown relay:relay /data

COPY --from=build /opt/venv /opt/venv
# relay.toml names them as "mappings/<provider>.toml", relative to itself.
COPY mappings/ /etc/relay/mappings/

# The SQLite database (and its -wal and -shm files) lives here: set database = "/data/relay.db".
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RELAY_PORT', '8000') + '/healthz', timeout=3)"]

# SIGTERM: new webhooks get 503, requests under way finish, in-flight batches are finished or
# handed back to the queue, then the process exits 0.
STOPSIGNAL SIGTERM
CMD ["relay", "serve"]
