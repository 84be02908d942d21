"""Tests for ldiffusion.nets.convnext_seg: encoder feature API, segmenter shapes, drop path, timm option."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError, LDiffusionError
from ldiffusion.nets.convnext_seg import (
    ConvNeXtEncoder,
    ConvNeXtSegmenter,
    DropPath,
    LayerNorm2d,
    TimmSegmenter,
    convnext_preset,
)
from tests.nets._contract import (
    assert_all_params_get_grad,
    assert_deterministic,
    assert_save_load_roundtrip,
    n_params,
)

HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_segmenter_shape(preset):
    # x (2, T=3, 64, 64) grey-map stack -> logits (2, 6, 64, 64)
    net = ConvNeXtSegmenter(3, 6, **convnext_preset(preset))
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 6, 64, 64)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_encoder_feature_info_matches_intermediates(preset):
    cfg = convnext_preset(preset)
    enc = ConvNeXtEncoder(5, cfg["dims"], cfg["depths"], cfg["stem_stride"])
    feats = enc.forward_intermediates(torch.randn(1, 5, 64, 64))
    assert len(feats) == len(enc.feature_info) == 4
    for f, info in zip(feats, enc.feature_info, strict=True):
        assert f.shape == (1, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    assert [i["reduction"] for i in enc.feature_info] == [cfg["stem_stride"] * 2**i for i in range(4)]
    assert torch.equal(enc.forward_features(torch.zeros(1, 5, 64, 64)), enc(torch.zeros(1, 5, 64, 64)))


def test_paper_preset_is_convnext_t_on_meta():
    with torch.device("meta"):
        net = ConvNeXtSegmenter(10, 6, **convnext_preset("paper"))
    enc_params = n_params(net.encoder)
    assert 27e6 < enc_params < 29e6  # ConvNeXt-T without its classifier head: 27.8 M
    assert [b for s in net.encoder.stages for b in s if type(b).__name__ == "ConvNeXtBlock"].__len__() == 18


def test_layernorm2d_matches_layernorm_over_channels():
    x = torch.randn(2, 6, 3, 4)
    ln = LayerNorm2d(6)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), expected)


def test_drop_path_train_vs_eval():
    dp = DropPath(0.5)
    x = torch.ones(64, 2, 2, 2)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    dp.generator = torch.Generator().manual_seed(0)
    a = dp(x)
    dp.generator = torch.Generator().manual_seed(0)
    b = dp(x)
    assert torch.equal(a, b)
    kept = a.flatten(1)[:, 0]
    assert set(kept.unique().tolist()) <= {0.0, 2.0} and 0 < (kept > 0).sum() < 64
    with pytest.raises(ConfigError):
        DropPath(1.0)


def test_backward_reaches_every_parameter():
    net = ConvNeXtSegmenter(3, 4, **convnext_preset("tiny"))
    out = net(torch.randn(2, 3, 32, 32))
    assert_all_params_get_grad(net, out.logsumexp(1).mean() - out[:, 1].mean())


def test_save_load_roundtrip(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    assert_save_load_roundtrip(
        lambda: ConvNeXtSegmenter(3, 4, **convnext_preset("small")), lambda m: m(x), tmp_path
    )


def test_deterministic_under_seed_and_eval_ignores_drop_path():
    x = torch.randn(1, 3, 64, 64)
    cfg = {**convnext_preset("tiny"), "drop_path_rate": 0.3}
    assert_deterministic(lambda: ConvNeXtSegmenter(3, 4, **cfg), lambda m: m(x))


def test_input_errors():
    net = ConvNeXtSegmenter(3, 2, **convnext_preset("small"))  # stride 4 * 2**3 = 32
    with pytest.raises(InputError, match=r"divisible by 32, got \(1, 3, 40, 40\); pad to \(64, 64\)"):
        net(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ConfigError, match="equal length"):
        ConvNeXtEncoder(3, (8, 16), (1,))


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed")
def test_timm_missing_names_the_extra():
    with pytest.raises(LDiffusionError, match=r'pip install "ldiffusion\[timm\]"'):
        TimmSegmenter("resnet18", 3, 2)


def test_timm_segmenter():
    pytest.importorskip("timm")
    net = TimmSegmenter("resnet18", 3, 2, decoder_dim=16)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16, 32]
