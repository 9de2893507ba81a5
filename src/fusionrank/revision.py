"""Which commit this code is: from its git checkout, or in an image from the REVISION file its build wrote.

No third-party import here: deploy/images.mk reads the image names (components/images.py, which uses this)
with a bare python3.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# The folder holding src/, components/ and pipelines/: a checkout, or /opt/fusionrank in an image.
CODE_ROOT = Path(__file__).resolve().parents[2]
# Written by the Dockerfile (build argument GIT_REVISION); images carry no .git.
REVISION_FILE = CODE_ROOT / "REVISION"
SHORT = 12


def git_revision(cwd: Path | None = None) -> str:
    """The checkout's commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True, cwd=cwd
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def code_revision() -> str:
    """The commit of the code in CODE_ROOT: the image's REVISION file, else `git rev-parse`, else unknown."""
    if REVISION_FILE.is_file():
        return REVISION_FILE.read_text().strip() or "unknown"
    return git_revision(CODE_ROOT)


def image_tag(version: str, revision: str) -> str:
    """An image tag naming both the release and the commit: `0.1.0-3f2a9c1d0b4e` (a valid OCI tag)."""
    return f"{version}-{revision[:SHORT]}"
