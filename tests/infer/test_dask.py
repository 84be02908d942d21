"""Slides on a (local, in-process) Dask cluster: one task per slide, the model loaded once per worker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")

from ldiffusion.infer.slide_predict import SlideJob, predict_slides_dask  # noqa: E402

LOADS: list[int] = []


class HalfModel:
    num_classes = 2

    def predict_proba(self, images, *, generator=None):
        b, _, h, w = images.shape
        return torch.full((b, 2, h, w), 0.5).index_fill_(1, torch.tensor([1]), 0.6)


@dataclasses.dataclass(frozen=True)
class CountingLoader:
    name: str = "half"

    def __call__(self):
        LOADS.append(1)
        return HalfModel()


@pytest.mark.timeout(120)
def test_local_cluster_predicts_all_slides(tmp_path):
    paths = []
    for i in range(3):
        img = np.full((256, 256, 3), 240, np.uint8)
        img[32:224, 32:224] = (200, 80, 160)
        tifffile.imwrite(tmp_path / f"d{i}.tif", img, photometric="rgb")
        paths.append(str(tmp_path / f"d{i}.tif"))
    LOADS.clear()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cl:
        res = predict_slides_dask(
            cl.scheduler_address,
            CountingLoader(),
            [SlideJob(p, 0.5) for p in paths],
            tmp_path / "out",
            tile_px=64,
            overlap_px=8,
            batch_size=4,
            formats="ome-tiff",
        )
    assert sorted(r.id for r in res) == ["d0", "d1", "d2"]
    assert len(LOADS) == 1  # one worker: loaded once
    for i in range(3):
        assert (tmp_path / "out" / f"d{i}" / "done.json").is_file()
