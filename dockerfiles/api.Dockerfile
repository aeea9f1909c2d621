# syntax=docker/dockerfile:1
# The serving image: FastAPI + ONNX Runtime, no torch, no compilers, non-root.
#   docker build -f dockerfiles/api.Dockerfile -t visionops-api .
#   docker run -p 8000:8000 -v "$PWD/exported:/models/current:ro" visionops-api
#   (or -e MLFLOW_TRACKING_URI=http://mlflow:5000 -e VISIONOPS_MODEL_URI=models:/visionops-mnist@champion)

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# The base install has no torch: only the [train] extra pulls it in.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install -c constraints.txt . \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM python:3.11-slim-bookworm
ARG MODEL_VERSION=unknown
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="visionops-api" \
      org.opencontainers.image.description="visionops prediction service (ONNX Runtime)" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      io.visionops.model-version="${MODEL_VERSION}"
RUN useradd --create-home --uid 10001 visionops
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    VISIONOPS_MODEL_URI=/models/current \
    VISIONOPS_PREDLOG_URL=sqlite:////data/predictions.db
RUN mkdir -p /data /models && chown visionops:visionops /data
USER 10001
WORKDIR /home/visionops
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["sh", "-c", "exec visionops serve --host 0.0.0.0 --port 8000 --model-uri \"$VISIONOPS_MODEL_URI\""]
