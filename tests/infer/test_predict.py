"""Sliding-window prediction and folder writers."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import read_image, read_mask
from ldiffusion.infer.predict import gaussian_weight, predict_folder, predict_image, tile_starts
from ldiffusion.methods.base import MethodConfig, Segmenter


class ConstSegmenter(Segmenter):
    """Returns the same probabilities everywhere; records the tile shapes it sees."""

    name: ClassVar[str] = "const"
    size_divisor = 8

    def __init__(self) -> None:
        super().__init__(MethodConfig(crop_px=32), num_classes=3)
        self.p = torch.tensor([0.2, 0.5, 0.3])
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.shapes: list[tuple[int, ...]] = []

    def training_step(self, batch, generator, stage):
        raise NotImplementedError

    def predict_proba(self, images, *, generator=None):
        self.shapes.append(tuple(images.shape))
        b, _, h, w = images.shape
        return self.p.view(1, 3, 1, 1).expand(b, 3, h, w).clone()


class RampSegmenter(ConstSegmenter):
    """Class-1 probability follows the image's red channel: the output must reproduce it seamlessly."""

    def predict_proba(self, images, *, generator=None):
        r = images[:, :1]
        return torch.cat([1 - r, r], 1)


def test_constant_model_gives_constant_output_no_seams():
    seg = ConstSegmenter()
    img = np.random.default_rng(0).integers(0, 255, (70, 101, 3), dtype=np.uint8)
    probs = predict_image(seg, img, tile_px=30, overlap_px=10, batch_size=3)
    assert probs.shape == (3, 70, 101)
    torch.testing.assert_close(probs, seg.p.view(3, 1, 1).expand(3, 70, 101), atol=1e-6, rtol=0)
    assert all(s[-1] == 32 and s[-2] == 32 for s in seg.shapes)  # tile rounded up to the divisor


def test_pixelwise_model_reproduced_exactly_across_tiles():
    seg = RampSegmenter()
    seg.num_classes = 2
    img = np.random.default_rng(1).integers(0, 255, (45, 77, 3), dtype=np.uint8)
    probs = predict_image(seg, img, tile_px=16, overlap_px=4)
    torch.testing.assert_close(probs[1], torch.from_numpy(img[..., 0] / 255.0).float(), atol=1e-5, rtol=0)


def test_small_image_padded_and_uncertainty():
    seg = ConstSegmenter()
    img = np.zeros((5, 9, 3), np.uint8)
    probs, unc = predict_image(seg, img, return_uncertainty=True)
    assert probs.shape == (3, 5, 9) and unc.shape == (5, 9)
    ent = -(seg.p * seg.p.log()).sum() / np.log(3)
    torch.testing.assert_close(unc, torch.full((5, 9), float(ent)), atol=1e-5, rtol=0)


def test_tiling_helpers_and_errors():
    assert tile_starts(100, 32, 24) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 24) == [0]
    w = gaussian_weight(16)
    assert float(w.max()) == 1.0 and float(w.min()) > 0
    with pytest.raises(InputError, match="overlap_px"):
        predict_image(ConstSegmenter(), np.zeros((8, 8, 3), np.uint8), tile_px=16, overlap_px=16)
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        predict_image(ConstSegmenter(), np.zeros((8, 8), np.uint8))


def test_predict_folder_writes_readable_outputs(synth_root, tmp_path):
    seg = ConstSegmenter()
    ids = predict_folder(seg, tmp_path / "out", data_root=synth_root, split="test", save_prob=True,
                         save_uncertainty=True, progress=False)
    assert ids
    for case_id in ids:
        mask = read_mask(tmp_path / "out" / f"{case_id}.png")
        img = read_image(synth_root / "images" / f"{case_id}.png")
        assert mask.shape == img.shape[:2] and mask.dtype == np.uint8 and (mask == 1).all()
        assert read_image(tmp_path / "out" / f"{case_id}_overlay.png").shape == img.shape
        assert np.load(tmp_path / "out" / f"{case_id}_prob.npy").shape == (3, *img.shape[:2])
        assert read_mask(tmp_path / "out" / f"{case_id}_unc.png").shape == img.shape[:2]
    # loose image files too
    one = synth_root / "images" / f"{ids[0]}.png"
    assert predict_folder(seg, tmp_path / "loose", images=[one], progress=False) == [ids[0]]
    with pytest.raises(InputError, match="no such image"):
        predict_folder(seg, tmp_path / "x", images=[tmp_path / "missing.png"], progress=False)
