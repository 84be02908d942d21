"""Tests for ldiffusion.nets.seg_unet.SegUNet (U-Net baseline net)."""

from __future__ import annotations

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.seg_unet import SegUNet, seg_unet_preset
from tests.nets._contract import (
    assert_all_params_get_grad,
    assert_deterministic,
    assert_save_load_roundtrip,
    n_params,
)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_output_shape(preset):
    # x (2, 3, 64, 64) -> logits (2, 3, 64, 64)
    net = SegUNet(3, 3, **seg_unet_preset(preset))
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_paper_preset_parameter_count_on_meta():
    with torch.device("meta"):
        net = SegUNet(3, 2, **seg_unet_preset("paper"))
    assert 1e7 < n_params(net) < 4e7  # original U-Net widths, ~31 M


def test_backward_reaches_every_parameter():
    net = SegUNet(3, 2, **seg_unet_preset("tiny"))
    out = net(torch.randn(2, 3, 32, 32))
    assert_all_params_get_grad(net, out.logsumexp(1).mean() - out[:, 0].mean())


def test_save_load_roundtrip_includes_batchnorm_stats(tmp_path):
    x = torch.randn(2, 3, 32, 32)

    def make():
        net = SegUNet(3, 2, **seg_unet_preset("tiny"))
        net.train()
        with torch.no_grad():
            net(x + torch.rand(()))  # update running stats differently per seed
        return net

    assert_save_load_roundtrip(make, lambda m: m(x), tmp_path)


def test_deterministic_under_seed():
    x = torch.randn(1, 3, 32, 32)
    assert_deterministic(lambda: SegUNet(3, 2, **seg_unet_preset("small")), lambda m: m(x))


def test_errors():
    with pytest.raises(InputError, match=r"divisible by 4, got \(1, 3, 30, 30\); pad to \(32, 32\)"):
        SegUNet(3, 2, **seg_unet_preset("tiny"))(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ConfigError, match="depth >= 2"):
        SegUNet(3, 2, depth=1)
