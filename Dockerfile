# Container image for devin-usage-exporter.
#   docker build -t devin-usage-exporter .
#   docker run --rm -p 9877:9877 -e DEVIN_API_KEY \
#     -v "$PWD/config.yaml:/etc/devin-usage-exporter/config.yaml:ro" devin-usage-exporter
# Kubernetes ignores HEALTHCHECK; the Helm chart (helm/devin-usage-exporter) uses httpGet probes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- deps: the runtime dependencies in a venv, from pyproject.toml alone, so this layer is
# rebuilt only when the dependencies change, not on every code change.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

# --- build: the project's own wheel (no dependencies: those are in the deps stage).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: the venv, then the wheel on top of it, as a non-root numeric user.
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="devin-usage-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Devin enterprise usage metrics (sessions, searches, PRs) per org set" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 exporter \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin exporter
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /wheels/ /tmp/wheels/
# --no-index --no-deps: installs exactly the project wheel; every dependency is already in the venv.
RUN pip install --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && devin-usage-exporter --version
USER 10001:10001
EXPOSE 9877
# Standard library only: the slim image has no curl or wget. Assumes server.listen's port is 9877.
# Tries plain HTTP, then HTTPS (a web_config_file with TLS; the probe only asks "alive?", so the
# self-signed case is accepted). /healthz never needs credentials.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import ssl, sys, urllib.request as r\nfor s in ('http', 'https'):\n    try:\n        r.urlopen(s + '://127.0.0.1:9877/healthz', timeout=2, context=ssl._create_unverified_context())\n        sys.exit(0)\n    except Exception:\n        pass\nsys.exit(1)"]
ENTRYPOINT ["devin-usage-exporter"]
CMD ["--config", "/etc/devin-usage-exporter/config.yaml"]
