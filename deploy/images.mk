# Container images (included from the Makefile). The names and tags are read from components/images.py, the
# one place the compiled pipeline takes them from (package version + git commit), so what is built is what the
# pipeline runs. tests/test_deploy.py checks these commands against that module (`make -n`).
#
#   make images / images-push   both Dockerfile targets with a Docker engine, from the public Python image
#   make image                  the CPU image with podman on this machine: no Docker engine, no registry
#
#   make images DOCKER_BUILD_ARGS='--build-arg BASE_IMAGE=...'   another pinned base
#   make images DOCKER=podman                                      another engine with the same CLI

DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
# Only the version and revision modules are imported: no virtual environment is needed to read the names.
IMAGES_PYTHON ?= python3
image_name = $(shell PYTHONPATH=src:. $(IMAGES_PYTHON) -c "from components.images import $(1); print($(1))")
CPU_IMAGE = $(call image_name,CPU_IMAGE)
GPU_IMAGE = $(call image_name,GPU_IMAGE)
IMAGE_VERSION = $(shell PYTHONPATH=src $(IMAGES_PYTHON) -c "from fusionrank import __version__; print(__version__)")
GIT_REVISION = $(shell PYTHONPATH=src $(IMAGES_PYTHON) -c "from fusionrank.revision import code_revision; print(code_revision())")
# The build stages mount this folder at /wheels (empty unless `make wheelhouse` filled it; only read when
# PIP_OPTIONS says so).
WHEELHOUSE := build/wheelhouse
IMAGE_BUILD_ARGS = --build-arg VERSION=$(IMAGE_VERSION) --build-arg GIT_REVISION=$(GIT_REVISION)

.PHONY: images image-cpu image-gpu images-push podman-tools base-image wheelhouse image

images: image-cpu image-gpu

image-cpu:
	mkdir -p $(WHEELHOUSE)
	DOCKER_BUILDKIT=1 $(DOCKER) build --target cpu $(IMAGE_BUILD_ARGS) $(DOCKER_BUILD_ARGS) -t $(CPU_IMAGE) .

image-gpu:
	mkdir -p $(WHEELHOUSE)
	DOCKER_BUILDKIT=1 $(DOCKER) build --target gpu $(IMAGE_BUILD_ARGS) $(DOCKER_BUILD_ARGS) -t $(GPU_IMAGE) .

images-push: images
	$(DOCKER) push $(CPU_IMAGE)
	$(DOCKER) push $(GPU_IMAGE)

# ---------------------------------------------------------------------------------------------------------
# `make image`: the CPU image with podman, from nothing, idempotently (see ../shared/STACK-NOTES.md,
# "Containers without Docker"). Each step is skipped when its result is there:
#   podman-tools  apt-get install podman, runc, debootstrap and Debian's python3-venv (root; once per machine)
#   base-image    a Debian 12 root filesystem from debootstrap, imported as LOCAL_BASE_IMAGE (~1 min)
#   wheelhouse    every dependency as a wheel for the image's Python, made on the host (~1-2 min; again
#                 only when pyproject.toml or constraints.txt change)
#   image         podman build --target cpu: dependencies from the wheelhouse, then the code (a code-only
#                 change rebuilds the last layers only)
# Local runs use the CPU image for the fine-tuning step too (fusionrank.containers says how).

LOCAL_BASE_IMAGE ?= localhost/fusionrank-base:bookworm
PODMAN_CONF := $(CURDIR)/deploy/podman/containers.conf
PODMAN := CONTAINERS_CONF=$(PODMAN_CONF) podman
PODMAN_PACKAGES := podman runc debootstrap python3-venv

podman-tools:
	@if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null \
	    || ! /usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null; then \
	  echo "installing $(PODMAN_PACKAGES) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PODMAN_PACKAGES) >/dev/null; \
	fi

base-image: podman-tools
	CONTAINERS_CONF=$(PODMAN_CONF) deploy/podman/base-image.sh $(LOCAL_BASE_IMAGE) build/container/base

$(WHEELHOUSE)/.complete: pyproject.toml constraints.txt deploy/dependencies.py deploy/podman/wheelhouse.sh \
		| base-image
	CONTAINERS_CONF=$(PODMAN_CONF) deploy/podman/wheelhouse.sh $(WHEELHOUSE) $(LOCAL_BASE_IMAGE)
	touch $@

wheelhouse: $(WHEELHOUSE)/.complete

image: wheelhouse
	$(PODMAN) build --target cpu --build-arg BASE_IMAGE=$(LOCAL_BASE_IMAGE) \
	  --build-arg PIP_OPTIONS="--no-index --find-links /wheels" $(IMAGE_BUILD_ARGS) -t $(CPU_IMAGE) .
	@echo "built $(CPU_IMAGE): $$($(PODMAN) image inspect --format '{{.Size}}' $(CPU_IMAGE) \
	  | awk '{printf "%.2f GB", $$1 / 1e9}')"

# ---------------------------------------------------------------------------------------------------------
# `make manifests OVERLAY=prod`: the overlay as it is applied, with the project image at this checkout's tag
# (written to build/manifests/OVERLAY; `kubectl apply -k build/manifests/prod`). The committed manifests name
# the image repository at the bare version; a tag with the commit in it cannot be committed with that commit.

OVERLAY ?= prod
MANIFESTS_OUT ?= build/manifests
CPU_REPOSITORY = $(call image_name,CPU_REPOSITORY)
IMAGE_TAG = $(call image_name,IMAGE_TAG)

.PHONY: manifests

manifests:
	@test -f manifests/overlays/$(OVERLAY)/kustomization.yaml \
	  || { echo "no overlay manifests/overlays/$(OVERLAY)" >&2; exit 1; }
	mkdir -p $(MANIFESTS_OUT)/$(OVERLAY)
	printf '%s\n' "# Written by make manifests: manifests/overlays/$(OVERLAY) with the image of $(GIT_REVISION)." \
	  "apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization" "resources:" \
	  "  - $$(realpath --relative-to=$(MANIFESTS_OUT)/$(OVERLAY) manifests/overlays/$(OVERLAY))" \
	  "images:" "  - name: $(CPU_REPOSITORY)" "    newTag: $(IMAGE_TAG)" \
	  >$(MANIFESTS_OUT)/$(OVERLAY)/kustomization.yaml
	@echo "wrote $(MANIFESTS_OUT)/$(OVERLAY)/kustomization.yaml (image $(CPU_REPOSITORY):$(IMAGE_TAG))"
