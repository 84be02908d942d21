"""Shared fixtures: the location of ../shared/data and small generated data sets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("LDIFFUSION_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir() and (c / "README.md").exists():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is absent."""
    d = _shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is not available")
    return d


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic data set (24 images of 64 px, seed 0) built once per session; treat as read-only."""
    from ldiffusion.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth") / "synth"
    make_synthetic_dataset(root, n=24, size=64, seed=0)
    return root


@pytest.fixture
def drop_cli_log_handlers():
    """`ldiffusion.cli.main` points logging at the captured stderr; drop that handler when the test ends."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler:
            root.removeHandler(h)
