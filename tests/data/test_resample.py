"""Working resolution (`input_scale`): training arrays, validation and `predict` resized by one rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldiffusion.core.errors import ConfigError
from ldiffusion.data.dataset import SegmentationDataset
from ldiffusion.data.resample import resize_image, resize_maps, resize_proba, scaled_size
from ldiffusion.infer.predict import predict_image
from ldiffusion.methods import create_method, resolve_config
from ldiffusion.methods.sliding import scaled_predict_proba


def test_resize_maps_keeps_ids_and_halves_the_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 64, 3), dtype=np.uint8)
    label = np.zeros((50, 64), np.uint8)
    label[10:30, 10:40] = 1
    label[0, :] = 255
    inst = np.zeros((50, 64), np.int32)
    inst[10:30, 10:25], inst[10:30, 25:40] = 7, 70000
    small, lab, ins = resize_maps(image, label, inst, 0.5)
    assert small.shape == (25, 32, 3) and small.dtype == np.uint8
    assert lab.shape == ins.shape == (25, 32) and lab.dtype == np.uint8 and ins.dtype == np.int32
    assert set(np.unique(lab)) == {0, 1, 255} and set(np.unique(ins)) == {0, 7, 70000}
    assert resize_maps(image, label, None, 1.0)[0] is image  # 1 = untouched
    # a constant image stays constant (antialiased bilinear averages, never invents values)
    flat = np.full((50, 64, 3), 123, np.uint8)
    assert (resize_maps(flat, label, None, 0.37)[0] == 123).all()


def test_resize_proba_returns_to_the_input_size_and_sums_to_one():
    p = torch.softmax(torch.randn(1, 3, 25, 32, generator=torch.Generator().manual_seed(0)), 1)
    big = resize_proba(p, (50, 64))
    assert big.shape == (1, 3, 50, 64)
    torch.testing.assert_close(big.sum(1), torch.ones(1, 50, 64))
    assert scaled_size(522, 775, 0.5) == (261, 388)


def test_dataset_scale_resizes_what_training_sees(synth_root):
    full = SegmentationDataset(synth_root, "train")
    half = SegmentationDataset(synth_root, "train", scale=0.5)
    a, b = full[0], half[0]
    h, w = a["label"].shape
    assert b["label"].shape == scaled_size(h, w, 0.5) and b["image"].shape[-2:] == b["label"].shape
    assert set(b["label"].unique().tolist()) <= set(a["label"].unique().tolist())
    with pytest.raises(ValueError, match="scale"):
        SegmentationDataset(synth_root, "train", scale=0.0)


def _unet(scale: float):
    torch.manual_seed(0)
    cfg = resolve_config("unet", None, "tiny", ["crop_px=32", f"input_scale={scale}"])
    method = create_method("unet", cfg, num_classes=3).eval()
    with torch.no_grad():
        method.net.head.weight.mul_(100.0)  # spread-out logits: several classes
    return method


def test_a_scaled_model_predicts_at_the_working_resolution_and_returns_the_input_size():
    method = _unet(0.5)
    image = np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    probs = predict_image(method, image, tile_px=32)
    assert probs.shape == (3, 60, 60)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None] / 255.0
    with torch.no_grad():  # one 32 px tile holds the whole 30 px working image (padded), so this is exact
        small = resize_image(x, (30, 30))
        pad = torch.nn.functional.pad(small, (0, 2, 0, 2), mode="reflect")
        direct = resize_proba(method.predict_proba(pad)[..., :30, :30], (60, 60))[0]
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-5)
    # validation scores exactly the map predict writes
    pred = probs.argmax(0)
    batch = {"image": x, "label": pred[None].long()}
    assert method.validation_score([batch], torch.Generator(), "main") == pytest.approx(1.0)
    # and the scale changes the output: the same weights at full resolution give another map
    unscaled = _unet(1.0)
    unscaled.load_state_dict(method.state_dict())
    assert not torch.allclose(predict_image(unscaled, image, tile_px=32), probs)


def test_slide_tiles_of_a_scaled_model_are_padded_to_its_size_divisor():
    method = _unet(0.3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p = scaled_predict_proba(method, x)  # 64 * 0.3 = 19 px, not a multiple of the divisor
    assert p.shape == (2, 3, 64, 64)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 64, 64))


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.5"])
def test_input_scale_is_checked(bad):
    with pytest.raises(ConfigError, match="input_scale"):
        resolve_config("unet", None, "tiny", [f"input_scale={bad}"])


def test_validation_widths_are_in_pixels_of_the_files():
    from ldiffusion.cli.train import full_resolution_px

    assert full_resolution_px(3, 0.5) == 6  # a 3 px boundary at half resolution is 6 px in the files
    assert full_resolution_px(9, 1.0) == 9 and full_resolution_px(None, 0.5) is None
    assert full_resolution_px(1, 0.9) == 1
