"""The container images the components run in: one place, tagged with the package version and the commit of
the code they hold (`0.1.0-<12 hex digits>`, never latest).

The tag is read when this module is imported, because KFP builds each component's spec, image included, when
its decorator runs: the compiled pipeline then names exactly the image `make image` / `make images` build
from the same commit. In a checkout the commit comes from git; inside an image (where the schedule Job
compiles the pipeline) from the REVISION file its build wrote, so it names that image's own tag.
"""

from fusionrank import __version__
from fusionrank.revision import code_revision, image_tag

REGISTRY = "ghcr.io/fusionrank"
CPU_REPOSITORY = f"{REGISTRY}/fusionrank"
GPU_REPOSITORY = f"{REGISTRY}/fusionrank-cuda"
IMAGE_TAG = image_tag(__version__, code_revision())
CPU_IMAGE = f"{CPU_REPOSITORY}:{IMAGE_TAG}"
GPU_IMAGE = f"{GPU_REPOSITORY}:{IMAGE_TAG}"
