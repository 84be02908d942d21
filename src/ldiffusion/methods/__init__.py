"""Methods: the `METHODS` registry, `create_method` (factory) and `load_segmenter` (run folder -> model).

Example:
    >>> from ldiffusion.methods import METHODS, create_method
    >>> "unet" in METHODS
    True
    >>> m = create_method("unet", preset="tiny", num_classes=3)
    >>> m.cfg.crop_px
    64
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ldiffusion.core.config import apply_overrides
from ldiffusion.core.errors import CheckpointError, ConfigError
from ldiffusion.core.io import load_weights, read_json
from ldiffusion.core.registry import Registry, suggest
from ldiffusion.methods.base import MethodConfig, OptimizerSpec, Segmenter, Stage, Trainable

METHODS: Registry[type[Trainable]] = Registry("method")


def _register_builtin() -> None:
    from ldiffusion.methods.autoencoder import AutoencoderMethod
    from ldiffusion.methods.cdal import CDALMethod
    from ldiffusion.methods.ldiffusion import LDiffusionMethod
    from ldiffusion.methods.ldseg import LDSegSegmenter
    from ldiffusion.methods.unet import UNetMethod

    for cls in (UNetMethod, AutoencoderMethod, LDiffusionMethod, LDSegSegmenter, CDALMethod):
        METHODS.register(cls.name)(cls)


_register_builtin()


def resolve_config(name: str, cfg: dict[str, Any] | MethodConfig | None = None, preset: str | None = None,
                   overrides: Sequence[str] = ()) -> MethodConfig:
    """Resolve a method config: defaults < preset < `cfg` mapping < `key=value` overrides.

    Raises:
        ConfigError: unknown method, preset, key or invalid value.
    """
    cls = METHODS.get(name)
    if isinstance(cfg, MethodConfig):
        if overrides:
            return cls.config_cls.from_dict(apply_overrides(cfg.to_dict(), list(overrides)))
        return cfg
    data: dict[str, Any] = {}
    preset = preset if preset is not None else (cfg or {}).get("preset", "tiny")
    if preset not in cls.presets:
        names = sorted(cls.presets)
        raise ConfigError(f"preset={preset!r} is not defined for method {name!r}; choose one of "
                          f"{names}{suggest(str(preset), names)}")
    data.update(cls.presets[preset])
    data["preset"] = preset
    data.update(cfg or {})
    data = apply_overrides(data, list(overrides))
    return cls.config_cls.from_dict(data)


def create_method(name: str, cfg: dict[str, Any] | MethodConfig | None = None, *, preset: str | None = None,
                  num_classes: int, in_channels: int = 3, class_names: Sequence[str] | None = None,
                  overrides: Sequence[str] = ()) -> Trainable:
    """Build method `name` with a resolved config; weights are initialised from `cfg.seed`.

    Initialisation draws from a forked copy of the global torch RNG seeded with `cfg.seed`, so the
    caller's global RNG state is unchanged and the same seed gives the same initial weights.
    """
    cls = METHODS.get(name)
    resolved = resolve_config(name, cfg, preset, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(resolved.seed)
        method = cls(resolved, num_classes=num_classes, in_channels=in_channels, class_names=class_names)
    if resolved.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def load_segmenter(directory: str | Path, device: str | torch.device = "cpu",
                   overrides: Sequence[str] = ()) -> Trainable:
    """Rebuild a trained method from a run folder (`config.json` + `model.safetensors`).

    Args:
        directory: run folder.
        device: where to put the weights.
        overrides: `key=value` inference-time config changes (e.g. LDSeg's `ddim_steps=11`,
            `n_samples=5`, `precision=fp32`); a change that alters the weights' shapes fails with a
            CheckpointError when the weights are loaded.

    Raises:
        CheckpointError: the folder or one of its files is missing or does not match.
        ConfigError: an override names an unknown key or an invalid value.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: run folder not found")
    cfg_path = directory / "config.json"
    weights_path = directory / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: not found; is {directory} a finished run folder "
                                  "(train with `ldiffusion train --out ...`)?")
    try:
        info = read_json(cfg_path)
        name = info["method"]
        cls = METHODS.get(name)
        cfg = cls.config_cls.from_dict(info["config"])
    except (KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{cfg_path}: cannot rebuild the method ({e})") from e
    if overrides:
        cfg = resolve_config(name, cfg, overrides=list(overrides))  # bad key/value -> ConfigError
    try:
        method = cls(cfg, num_classes=int(info["num_classes"]), in_channels=int(info.get("in_channels", 3)),
                     class_names=info.get("class_names"))
    except (KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{cfg_path}: cannot rebuild the method ({e})") from e
    method.extra_info = {k: v for k, v in info.items()
                         if k not in ("method", "config", "num_classes", "class_names", "in_channels",
                                      "ldiffusion_version")}
    try:
        method.load_inference_state_dict(load_weights(weights_path))
    except RuntimeError as e:  # shape mismatch, e.g. an override that changes a network's size
        raise CheckpointError(
            f"{weights_path}: weights do not fit the config"
            f"{' with ' + ', '.join(overrides) if overrides else ''}: {str(e)[:300]}"
        ) from e
    method.to(torch.device(device))
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    method.eval()
    return method


__all__ = ["METHODS", "MethodConfig", "OptimizerSpec", "Segmenter", "Stage", "Trainable", "create_method",
           "load_segmenter", "resolve_config"]
