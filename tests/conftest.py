"""Shared fixtures: the real data folder, and quiet/offline settings for every test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fusionrank.cli import QUIET_OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never touch the user's BentoML store; BentoML reads its home once per process, at first import.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="fusionrank-test-bentoml-")

for _key, _value in {
    **QUIET_OFFLINE_ENV,
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data shared beside the checkout; tests that need it skip (saying why) without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
