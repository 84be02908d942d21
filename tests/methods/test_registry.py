from __future__ import annotations

import pytest

from ldiffusion.core.errors import CheckpointError, ConfigError
from ldiffusion.methods import METHODS, create_method, load_segmenter, resolve_config


def test_registry_and_presets():
    assert {"unet", "autoencoder"} <= set(METHODS.names())
    cfg = resolve_config("unet", {"lr": 0.01}, "small", ["batch_size=2"])
    assert (cfg.encoder, cfg.crop_px, cfg.lr, cfg.batch_size, cfg.preset) == (
        "resnet18",
        256,
        0.01,
        2,
        "small",
    )


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'unet'"):
        create_method("unett", num_classes=2)
    with pytest.raises(ConfigError, match="preset='huge'"):
        create_method("unet", preset="huge", num_classes=2)
    with pytest.raises(ConfigError, match="unknown config key 'bsae'"):
        create_method("unet", {"bsae": 3}, num_classes=2)
    with pytest.raises(CheckpointError, match="run folder not found"):
        load_segmenter(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_segmenter(tmp_path / "r")
