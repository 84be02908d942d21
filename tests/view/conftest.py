"""Fixtures of the viewer tests: a synthetic slide with its real `slide predict` output, a running server."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")
pytest.importorskip("zarr")
pytest.importorskip("shapely")


@pytest.fixture(scope="session")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`slide predict` output of the 1600 x 1000 demo slide (+ uncertainty.ome.tif); read-only."""
    from ldiffusion.view.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("view") / "demo")


@pytest.fixture(scope="session")
def server_url(demo_out: Path):
    """Base URL of a viewer serving `demo_out` on 127.0.0.1 (a real uvicorn server in a thread)."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from ldiffusion.view.server import create_app, running
    from ldiffusion.view.sources import Catalog

    catalog = Catalog.discover(demo_out)
    with running(create_app(catalog)) as url:
        yield url
    catalog.close()
