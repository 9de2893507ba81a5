# syntax=docker/dockerfile:1
# The fusionrank container images, built from this checkout (`make images`, see deploy/images.mk):
#
#   --target cpu   every pipeline step but fine-tuning, the ranker server, the schedule Job
#                  -> components.images.CPU_IMAGE
#   --target gpu   finetune_bert, with torch's CUDA build -> components.images.GPU_IMAGE
#
# Both hold the same package and the same code layout, installed with constraints.txt at build time; nothing
# is pip-installed when a container runs (the components use install_kfp_package=False).
#
# The bases are build arguments pinned to version tags. Any Debian-like base with Python 3.11 works, e.g. one
# built with debootstrap (`--build-arg BASE_IMAGE=... --build-arg GPU_BASE_IMAGE=...`): the virtual
# environment is made with `python3 -m venv`, and each final stage starts from the base its venv was built
# on, so the venv's interpreter link stays valid.
#
# The GPU image needs no CUDA base image: torch's Linux wheels carry the CUDA runtime and cuDNN (the nvidia-*
# packages), and the node's driver comes in through the NVIDIA device plugin. A CUDA base would add a second
# copy of those libraries, and its Ubuntu Python is not the 3.11 that constraints.txt was frozen on.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm
ARG GPU_BASE_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# Build stages: a virtual environment with every dependency, then the project itself (editable, see below).

FROM ${BASE_IMAGE} AS build-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /opt/fusionrank
# Dependencies before the code, so that a code change does not reinstall them. The package's __init__ alone
# is enough for pip to read the version and the dependency list from pyproject.toml.
COPY pyproject.toml constraints.txt README.md ./
COPY src/fusionrank/__init__.py src/fusionrank/__init__.py
# torch first, from the CPU index, as `make install` does: any other source pulls gigabytes of CUDA wheels.
# constraints.txt pins torch==2.13.0, which the CPU build (2.13.0+cpu) satisfies.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -c constraints.txt .
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY feature_repo/definitions.py feature_repo/feature_store.yaml feature_repo/feature_store.cluster.yaml \
     ./feature_repo/
COPY conf ./conf
COPY deploy/fetch_champion.py ./deploy/fetch_champion.py
# Editable on purpose: the package finds serving/ and feature_repo/ next to src/ (packaging.default_serving_dir,
# features.default_feature_repo), so the code stays in this tree and the venv points at it.
RUN pip install --no-deps -c constraints.txt -e . \
    && python3 -m compileall -q src components pipelines serving deploy

FROM ${GPU_BASE_IMAGE} AS build-gpu
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /opt/fusionrank
COPY pyproject.toml constraints.txt README.md ./
COPY src/fusionrank/__init__.py src/fusionrank/__init__.py
# torch first, its CUDA build (PyPI's Linux wheel bundles the CUDA runtime); then the project with the `gpu`
# extra, under the same constraints as the CPU image.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -c constraints.txt ".[gpu]"
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY feature_repo/definitions.py feature_repo/feature_store.yaml feature_repo/feature_store.cluster.yaml \
     ./feature_repo/
COPY conf ./conf
COPY deploy/fetch_champion.py ./deploy/fetch_champion.py
RUN pip install --no-deps -c constraints.txt -e ".[gpu]" \
    && python3 -m compileall -q src components pipelines serving deploy

# ---------------------------------------------------------------------------------------------------------
# Final stages: the venv and the code, owned by root and read-only to the user that runs them.

FROM ${BASE_IMAGE} AS cpu
ARG VERSION=unversioned
LABEL org.opencontainers.image.title="fusionrank" \
      org.opencontainers.image.description="fusionrank pipeline components and ranker server (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fusionrank \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/fusionrank --create-home fusionrank
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /opt/fusionrank /opt/fusionrank
# Offline and quiet, as the CLI sets them (see ../shared/STACK-NOTES.md for why each is needed).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/fusionrank \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    BENTOML_DO_NOT_TRACK=true \
    MLFLOW_LOGGING_LEVEL=WARNING
USER 10001:10001
WORKDIR /home/fusionrank
CMD ["fusionrank", "--help"]

FROM ${GPU_BASE_IMAGE} AS gpu
ARG VERSION=unversioned
LABEL org.opencontainers.image.title="fusionrank-cuda" \
      org.opencontainers.image.description="fusionrank BERT fine-tuning component (CUDA)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fusionrank \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/fusionrank --create-home fusionrank
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /opt/fusionrank /opt/fusionrank
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/fusionrank \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    BENTOML_DO_NOT_TRACK=true \
    MLFLOW_LOGGING_LEVEL=WARNING \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/fusionrank
CMD ["fusionrank", "--help"]
