# syntax=docker/dockerfile:1
# The training image: the whole pipeline (torch CPU, DVC, MLflow), non-root.
#   docker build -f dockerfiles/train.Dockerfile -t visionops-train .
#   docker run -e MLFLOW_TRACKING_URI=http://mlflow:5000 visionops-train

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt ".[train]"

FROM python:3.11-slim-bookworm
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="visionops-train" \
      org.opencontainers.image.revision="${GIT_SHA}"
RUN useradd --create-home --uid 10001 visionops
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    OMP_WAIT_POLICY=PASSIVE
WORKDIR /workspace
COPY --chown=visionops:visionops . /workspace
USER 10001
# The image holds no .git (see .dockerignore): DVC runs without an SCM.
RUN dvc config --local core.no_scm true \
    && dvc config --local core.analytics false
CMD ["visionops", "pipeline", "run"]
