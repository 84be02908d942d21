"""H&E stain augmentation: seeded, identity at zero jitter, and it moves the stain densities."""

from __future__ import annotations

import numpy as np
import torch

from ldiffusion.data.transforms import TrainTransform, hed_perturb, stain_jitter


def _he_like(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((32, 32, 3), np.uint8)
    img[...] = (230, 180, 215)  # eosin-ish background
    img[8:20, 8:20] = (90, 50, 130)  # haematoxylin-ish nucleus
    noise = rng.integers(-10, 11, img.shape)
    return np.clip(img.astype(int) + noise, 1, 255).astype(np.uint8)


def test_identity_parameters_give_the_image_back():
    img = _he_like()
    assert np.abs(hed_perturb(img, np.ones(3), np.zeros(3)).astype(int) - img).max() <= 1
    # zero strength: no draws, same object
    g = torch.Generator().manual_seed(0)
    assert stain_jitter(img, 0.0, 0.0, generator=g) is img
    assert g.initial_seed() == 0 and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_seeded_and_changes_the_haematoxylin_density():
    img = _he_like()
    a = stain_jitter(img, 0.3, 0.03, generator=torch.Generator().manual_seed(3))
    b = stain_jitter(img, 0.3, 0.03, generator=torch.Generator().manual_seed(3))
    c = stain_jitter(img, 0.3, 0.03, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    from skimage.color import rgb2hed

    darker = hed_perturb(img, np.array([1.5, 1.0, 1.0]), np.zeros(3))
    assert rgb2hed(darker)[8:20, 8:20, 0].mean() > 1.3 * rgb2hed(img)[8:20, 8:20, 0].mean()


def test_train_transform_applies_stain_jitter_to_the_image_only():
    img = _he_like()
    lab = np.zeros((32, 32), np.uint8)
    lab[8:20, 8:20] = 1
    t = TrainTransform(flips=False, rot90=False, stain_jitter=0.3, stain_bias=0.03)
    out, out_lab, _ = t(img, lab, generator=torch.Generator().manual_seed(1))
    assert not np.array_equal(out, img)
    assert np.array_equal(out_lab, lab)
