"""The container images the components run in: one place, tagged with the package version (never latest)."""

from fusionrank import __version__

REGISTRY = "ghcr.io/fusionrank"
CPU_IMAGE = f"{REGISTRY}/fusionrank:{__version__}"
GPU_IMAGE = f"{REGISTRY}/fusionrank-cuda:{__version__}"
