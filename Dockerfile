# syntax=docker/dockerfile:1
# Two images from one Dockerfile:
#   docker build --target operator -t kubedistill/operator:0.1.0 .   # the kopf operator: slim Python, no torch
#   docker build --target trainer  -t kubedistill/trainer:0.1.0  .   # what KubeRay's head/worker pods run
# Layers go from what changes least to what changes most: base, OS user, pinned dependencies
# (docker/requirements-*.txt), then the project's own sources. tests/unit/test_dockerfile.py checks what can
# be checked without a Docker daemon (paths, entrypoints, pins, no torch in the operator).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# A CUDA PyTorch base: torch comes from here and pip keeps it (see the trainer stage).
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
# Must equal the RayJob's rayVersion (spec.rayVersion, default in operator/distill_operator/resources.py).
ARG RAY_VERSION=2.60.0
# The non-root user of both images (numeric: runAsNonRoot can verify it). Ray pods run as spec.podSecurity.runAsUser
# (default 1000), which need not exist in /etc/passwd, but the image's files must be readable by it.
ARG APP_UID=1000

# ---------------------------------------------------------------------------------------------------- operator
FROM ${PYTHON_IMAGE} AS operator
ARG APP_UID
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid ${APP_UID} kubedistill \
 && useradd --uid ${APP_UID} --gid ${APP_UID} --create-home --home-dir /home/kubedistill --shell /usr/sbin/nologin kubedistill
WORKDIR /opt/kubedistill
COPY docker/requirements-operator.txt docker/
RUN pip install --no-deps -r docker/requirements-operator.txt
COPY pyproject.toml README.md ./
COPY trainer/distill_trainer trainer/distill_trainer
COPY operator/distill_operator operator/distill_operator
RUN pip install --no-deps . \
 && rm -rf build *.egg-info \
 && pip check \
 && python -c "import distill_operator.handlers, distill_operator.__main__, sys; assert 'torch' not in sys.modules"
USER ${APP_UID}:${APP_UID}
# /healthz (kopf liveness) and /metrics (Prometheus)
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "distill_operator"]
CMD ["--bind-address=0.0.0.0"]

# ----------------------------------------------------------------------------------------------------- trainer
FROM ${TORCH_IMAGE} AS trainer
ARG APP_UID
ARG RAY_VERSION
LABEL io.kubedistill.ray-version=${RAY_VERSION}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/kubedistill
# Ubuntu 24.04 bases ship a user `ubuntu` with uid 1000: that uid becomes ours.
RUN getent passwd ${APP_UID} | cut -d: -f1 | xargs -r userdel --remove 2>/dev/null; \
    getent group ${APP_UID} | cut -d: -f1 | xargs -r groupdel 2>/dev/null; \
    groupadd --gid ${APP_UID} kubedistill \
 && useradd --uid ${APP_UID} --gid ${APP_UID} --create-home --home-dir /home/kubedistill --shell /bin/bash kubedistill
WORKDIR /opt/kubedistill
COPY docker/requirements-trainer.txt docker/
# torch is held at the base image's build, so no dependency can swap in another (CPU or other CUDA) torch.
RUN torch_pin="torch==$(python -c 'import torch; print(torch.__version__)')" \
 && pip install -r docker/requirements-trainer.txt "ray[default]==${RAY_VERSION}" "$torch_pin"
COPY pyproject.toml README.md ./
COPY trainer/distill_trainer trainer/distill_trainer
COPY operator/distill_operator operator/distill_operator
RUN pip install --no-deps . \
 && rm -rf build *.egg-info \
 && python -c "import ray, megatron.core, distill_trainer.cli; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && command -v kubedistill && command -v ray
USER ${APP_UID}:${APP_UID}
WORKDIR /home/kubedistill
# KubeRay sets the command (`ray start ...`) of head and worker pods and runs the job's entrypoint
# (`kubedistill train ...`, render.py) on the head; run alone, the image shows the trainer's help.
CMD ["kubedistill", "--help"]
