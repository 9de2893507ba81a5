# Container images (included from the Makefile): `make images` builds both targets of the Dockerfile where a
# Docker engine exists; `make images-push` pushes them. The names and tags are read from components/images.py,
# the one place the compiled pipeline takes them from (tagged with fusionrank.__version__), so what is built
# is what the pipeline runs. tests/test_deploy.py checks these commands against that module (`make -n`).
#
#   make images DOCKER_BUILD_ARGS='--build-arg BASE_IMAGE=...'   another pinned base (e.g. a debootstrap one)
#   make images DOCKER=podman                                      another engine with the same CLI

DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
# Only the version module is imported: no virtual environment is needed to read the names.
IMAGES_PYTHON ?= python3
image_name = $(shell PYTHONPATH=src:. $(IMAGES_PYTHON) -c "from components.images import $(1); print($(1))")
CPU_IMAGE = $(call image_name,CPU_IMAGE)
GPU_IMAGE = $(call image_name,GPU_IMAGE)
IMAGE_VERSION = $(shell PYTHONPATH=src $(IMAGES_PYTHON) -c "from fusionrank import __version__; print(__version__)")

.PHONY: images image-cpu image-gpu images-push

images: image-cpu image-gpu

image-cpu:
	DOCKER_BUILDKIT=1 $(DOCKER) build --target cpu --build-arg VERSION=$(IMAGE_VERSION) $(DOCKER_BUILD_ARGS) -t $(CPU_IMAGE) .

image-gpu:
	DOCKER_BUILDKIT=1 $(DOCKER) build --target gpu --build-arg VERSION=$(IMAGE_VERSION) $(DOCKER_BUILD_ARGS) -t $(GPU_IMAGE) .

images-push: images
	$(DOCKER) push $(CPU_IMAGE)
	$(DOCKER) push $(GPU_IMAGE)
