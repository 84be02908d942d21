"""Validation scores exactly the class map that `predict` writes (same tiles, same blending)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldiffusion.infer.predict import predict_image
from ldiffusion.methods import create_method, resolve_config
from ldiffusion.methods.sliding import default_tile_px


@pytest.mark.parametrize("sets", [[], ["encoder=resnet18"]], ids=["plain", "resnet18"])
def test_validation_dice_of_the_predicted_map_is_one(sets):
    torch.manual_seed(0)
    cfg = resolve_config("unet", None, "tiny", ["crop_px=32", *sets])
    method = create_method("unet", cfg, num_classes=3).eval()
    with torch.no_grad():
        method.net.head.weight.mul_(100.0)  # a random net with spread-out logits: several classes
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    pred = predict_image(method, image).argmax(0)
    assert len(torch.unique(pred)) >= 2
    batch = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None] / 255.0,
             "label": pred[None].long()}
    assert method.validation_score([batch], torch.Generator(), "main") == pytest.approx(1.0)
    # a different label gives a lower score, so the check above can fail
    batch["label"] = (pred[None].long() + 1) % 3
    assert method.validation_score([batch], torch.Generator(), "main") < 0.5


def test_wide_context_networks_predict_large_tiles():
    plain = create_method("unet", resolve_config("unet", None, "tiny", ["crop_px=64"]), num_classes=2)
    wide = create_method("unet", resolve_config("unet", None, "tiny", ["crop_px=64", "encoder=resnet18"]),
                         num_classes=2)
    assert default_tile_px(plain, 1000, 1000) == 64
    assert default_tile_px(wide, 1000, 1000) == 1000  # whole image up to 1024 px
    assert default_tile_px(wide, 4000, 3000) == 512


def test_tta_averages_the_eight_views():
    torch.manual_seed(0)
    method = create_method("unet", resolve_config("unet", None, "tiny", ["crop_px=32"]), num_classes=2).eval()
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain = predict_image(method, image)
    tta = predict_image(method, image, tta=True)
    assert not torch.allclose(plain, tta)
    # TTA output is invariant to flipping the input (the 8 views form a group)
    flipped = predict_image(method, np.ascontiguousarray(image[:, ::-1]), tta=True)
    torch.testing.assert_close(flipped.flip(-1), tta, atol=1e-4, rtol=1e-4)


def test_class_bias_reweights_every_prediction_path():
    from ldiffusion.core.errors import InputError
    from ldiffusion.methods.sliding import scaled_predict_proba

    torch.manual_seed(0)
    image = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)

    def method_with(sets):
        torch.manual_seed(0)
        return create_method("unet", resolve_config("unet", None, "tiny", ["crop_px=32", *sets]),
                             num_classes=3).eval()

    plain = method_with([])
    biased = method_with(["class_bias=[0.0, 1.5, -0.5]"])
    assert biased.cfg.class_bias == (0.0, 1.5, -0.5)
    p = predict_image(plain, image)
    q = predict_image(biased, image)
    w = torch.tensor([1.0, np.exp(1.5), np.exp(-0.5)], dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(q, p * w / (p * w).sum(0, keepdim=True), atol=1e-5, rtol=1e-5)
    assert (q.argmax(0) == 1).sum() > (p.argmax(0) == 1).sum()  # the decision moves towards class 1
    # the slide path (tiles at the input's resolution) applies the same reweighting
    x = torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None] / 255.0
    with torch.no_grad():
        a, b = scaled_predict_proba(plain, x[..., :32, :32]), scaled_predict_proba(biased, x[..., :32, :32])
    torch.testing.assert_close(b, a * w[None] / (a * w[None]).sum(1, keepdim=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="class_bias"):
        predict_image(method_with(["class_bias=[0.0, 1.0]"]), image)
