"""`core.registry.Registry`: register, get with "did you mean", immutability of names."""

from __future__ import annotations

import pytest

from ldiffusion.core.errors import ConfigError
from ldiffusion.core.registry import Registry, suggest


def _registry() -> Registry[type]:
    r: Registry[type] = Registry("method")

    @r.register("ldseg")
    class LDSeg:
        pass

    @r.register("unet")
    class UNet:
        pass

    return r


def test_register_get_names_contains_iter() -> None:
    r = _registry()
    assert r.get("unet").__name__ == "UNet"
    assert r.names() == ["ldseg", "unet"] and list(r) == ["ldseg", "unet"]
    assert "ldseg" in r and "cdal" not in r


def test_unknown_name_lists_choices_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        _registry().get("ldsegg")
    assert (
        str(e.value)
        == "method='ldsegg' is not registered; choose one of ['ldseg', 'unet'] (did you mean 'ldseg'?)"
    )


def test_no_suggestion_when_nothing_close() -> None:
    with pytest.raises(ConfigError) as e:
        _registry().get("zzzz")
    assert "did you mean" not in str(e.value)
    assert suggest("zzzz", ["unet"]) == ""


def test_duplicate_registration_rejected() -> None:
    r = _registry()
    with pytest.raises(ValueError, match="'unet' registered twice"):
        r.register("unet")(int)
