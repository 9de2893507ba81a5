# syntax=docker/dockerfile:1
# The fusionrank container images, built from this checkout (see deploy/images.mk):
#
#   --target cpu   every pipeline step but fine-tuning, the ranker server, the schedule Job
#                  -> components.images.CPU_IMAGE
#   --target gpu   finetune_bert, with torch's CUDA build -> components.images.GPU_IMAGE
#
# `make images` builds both with a Docker engine from the public Python image and the package indexes;
# `make image` builds the CPU one with podman on a machine without Docker or a registry: a base made with
# debootstrap (BASE_IMAGE) and every wheel from a wheelhouse made on the host (PIP_OPTIONS, see
# deploy/podman/). Both hold the same package and the same code layout, installed under constraints.txt at
# build time; nothing is pip-installed when a container runs (the components use install_kfp_package=False).
#
# Layers: the dependencies are a stage of their own, keyed on pyproject.toml, constraints.txt and the script
# that lists them, and each final stage continues from it: the code comes last, so a code-only change
# rebuilds only the last, small layers. (Continuing, not `COPY --from` the venv: that copy makes the builder
# checksum the 3 GB venv on every build, cached or not, which alone took about a minute.) The dependency stage
# holds only the venv and the files that list the dependencies: nothing is compiled there.
#
# The bases are build arguments pinned to version tags. Any Debian-like base with Python 3.11 works: the
# virtual environment is made with `python3 -m venv`.
#
# The GPU image needs no CUDA base image: torch's Linux wheels carry the CUDA runtime and cuDNN (the nvidia-*
# packages), and the node's driver comes in through the NVIDIA device plugin. A CUDA base would add a second
# copy of those libraries, and its Ubuntu Python is not the 3.11 that constraints.txt was frozen on.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm
ARG GPU_BASE_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------
# Dependency stages: a virtual environment with every dependency and nothing of the project.
# build/wheelhouse is mounted at /wheels; it is only read when PIP_OPTIONS says so
# (`--no-index --find-links /wheels`), and `make images` leaves it empty.

FROM ${BASE_IMAGE} AS build-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_OPTIONS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /opt/fusionrank
COPY pyproject.toml constraints.txt ./
COPY deploy/dependencies.py deploy/dependencies.py
# torch first, from the CPU index, as `make install` does: any other source pulls gigabytes of CUDA wheels.
# constraints.txt pins torch==2.13.0, which the CPU build (2.13.0+cpu) satisfies. setuptools and wheel let
# the final stage install the project itself without an index.
RUN --mount=type=bind,source=build/wheelhouse,target=/wheels \
    pip install ${PIP_OPTIONS} --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && python3 deploy/dependencies.py >/tmp/requirements.txt \
    && pip install ${PIP_OPTIONS} -c constraints.txt -r /tmp/requirements.txt "setuptools>=69" wheel \
    && rm /tmp/requirements.txt

FROM ${GPU_BASE_IMAGE} AS build-gpu
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG PIP_OPTIONS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /opt/fusionrank
COPY pyproject.toml constraints.txt ./
COPY deploy/dependencies.py deploy/dependencies.py
# torch first, its CUDA build (PyPI's Linux wheel bundles the CUDA runtime); then the dependencies with the
# `gpu` extra's, under the same constraints as the CPU image.
RUN --mount=type=bind,source=build/wheelhouse,target=/wheels \
    pip install ${PIP_OPTIONS} --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && python3 deploy/dependencies.py gpu >/tmp/requirements.txt \
    && pip install ${PIP_OPTIONS} -c constraints.txt -r /tmp/requirements.txt "setuptools>=69" wheel \
    && rm /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------------------
# Final stages: the dependency stage, then the code, owned by root and read-only to the user that runs them.
# The project is installed editable on purpose: the package finds serving/ and feature_repo/ next to src/
# (packaging.default_serving_dir, features.default_feature_repo), so the code stays in this tree and the venv
# points at it. That install takes nothing from an index (--no-deps --no-index); `pip check` fails the build
# when a dependency is missing from the venv.

FROM build-cpu AS cpu
ARG VERSION=unversioned
LABEL org.opencontainers.image.title="fusionrank" \
      org.opencontainers.image.description="fusionrank pipeline components and ranker server (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# LightGBM's wheel links the OpenMP runtime, which slim Python images lack (the debootstrap base has it).
RUN dpkg -s libgomp1 >/dev/null 2>&1 \
    || (apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*)
RUN groupadd --system --gid 10001 fusionrank \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/fusionrank --create-home fusionrank
# Offline and quiet, as the CLI sets them (see ../shared/STACK-NOTES.md for why each is needed).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/fusionrank \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    BENTOML_DO_NOT_TRACK=true \
    MLFLOW_LOGGING_LEVEL=WARNING
WORKDIR /opt/fusionrank
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY feature_repo/definitions.py feature_repo/feature_store.yaml feature_repo/feature_store.cluster.yaml \
     ./feature_repo/
COPY conf ./conf
COPY deploy/fetch_champion.py deploy/dependencies.py ./deploy/
RUN pip install --no-deps --no-index --no-build-isolation -e . \
    && pip check \
    && python3 -m compileall -q src components pipelines serving deploy
# The commit the code comes from: components/images.py reads REVISION to name this image's own tag when the
# pipeline is compiled inside it (the schedule Job), and the register step tags model versions with it.
ARG GIT_REVISION=unknown
RUN echo "${GIT_REVISION}" >REVISION
LABEL org.opencontainers.image.revision="${GIT_REVISION}"
ENV FUSIONRANK_GIT_REVISION=${GIT_REVISION}
USER 10001:10001
WORKDIR /home/fusionrank
CMD ["fusionrank", "--help"]

FROM build-gpu AS gpu
ARG VERSION=unversioned
LABEL org.opencontainers.image.title="fusionrank-cuda" \
      org.opencontainers.image.description="fusionrank BERT fine-tuning component (CUDA)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN dpkg -s libgomp1 >/dev/null 2>&1 \
    || (apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*)
RUN groupadd --system --gid 10001 fusionrank \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/fusionrank --create-home fusionrank
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/fusionrank \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    BENTOML_DO_NOT_TRACK=true \
    MLFLOW_LOGGING_LEVEL=WARNING \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/fusionrank
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY feature_repo/definitions.py feature_repo/feature_store.yaml feature_repo/feature_store.cluster.yaml \
     ./feature_repo/
COPY conf ./conf
COPY deploy/fetch_champion.py deploy/dependencies.py ./deploy/
RUN pip install --no-deps --no-index --no-build-isolation -e ".[gpu]" \
    && pip check \
    && python3 -m compileall -q src components pipelines serving deploy
ARG GIT_REVISION=unknown
RUN echo "${GIT_REVISION}" >REVISION
LABEL org.opencontainers.image.revision="${GIT_REVISION}"
ENV FUSIONRANK_GIT_REVISION=${GIT_REVISION}
USER 10001:10001
WORKDIR /home/fusionrank
CMD ["fusionrank", "--help"]
