"""`core.config`: strict from_dict, Literal choices, nesting, files, dotted overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from ldiffusion.core.config import Config, apply_overrides, check_range, parse_value
from ldiffusion.core.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optim(Config):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0.0, 1.0, lo_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train(Config):
    steps: int = 10
    crop_px: int | None = None
    sizes: tuple[int, ...] = (1, 2)
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_unknown_key_names_key_valid_keys_and_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        Train.from_dict({"stesp": 5})
    msg = str(e.value)
    assert (
        "'stesp'" in msg and "['crop_px', 'optim', 'sizes', 'steps']" in msg and "did you mean 'steps'" in msg
    )


def test_nested_unknown_key_has_prefix() -> None:
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*did you mean 'lr'"):
        Train.from_dict({"optim": {"lrr": 0.1}})


def test_literal_choices_listed() -> None:
    with pytest.raises(
        ConfigError, match=r"optim\.name='adma' is not valid; choose one of \['adam', 'sgd'\]"
    ):
        Train.from_dict({"optim": {"name": "adma"}})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Weighted(Config):
    class_weights: Literal["none", "inverse_freq"] = "inverse_freq"
    mode: Literal["a", "b"] = "a"


def test_none_override_selects_the_literal_choice_none() -> None:
    """`--set class_weights=none` parses to None; a Literal offering "none" takes it as that choice."""
    assert Weighted.from_dict(apply_overrides({}, ["class_weights=none"])).class_weights == "none"
    assert Weighted.from_dict(apply_overrides({}, ["class_weights=null"])).class_weights == "none"
    with pytest.raises(ConfigError, match=r"mode=None is not valid"):
        Weighted.from_dict(apply_overrides({}, ["mode=none"]))


def test_types_ranges_and_nesting() -> None:
    cfg = Train.from_dict({"steps": 3.0, "sizes": [4, 5], "crop_px": None, "optim": {"name": "sgd", "lr": 1}})
    assert cfg.steps == 3 and cfg.sizes == (4, 5) and cfg.optim == Optim(name="sgd", lr=1.0)
    assert Train.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(steps=7).steps == 7
    with pytest.raises(ConfigError, match="steps='x' should be an integer"):
        Train.from_dict({"steps": "x"})
    with pytest.raises(ConfigError, match=r"lr=0\.0 is out of range; expected \(0\.0, 1\.0\]"):
        Optim(lr=0.0)


def test_from_file_json_and_yaml_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"steps": 4, "optim": {"lr": 0.5}}))
    (tmp_path / "c.yaml").write_text("steps: 4\noptim:\n  lr: 0.5\n")
    for name in ("c.json", "c.yaml"):
        cfg = Train.from_file(tmp_path / name, overrides=["optim.name=sgd", "sizes=[8, 9]"])
        assert cfg == Train(steps=4, sizes=(8, 9), optim=Optim(name="sgd", lr=0.5))
    with pytest.raises(ConfigError, match="not found"):
        Train.from_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json: cannot parse"):
        Train.from_file(tmp_path / "bad.json")


def test_overrides_and_parse_value() -> None:
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c.d=true", "e=hello"])
    assert out == {"a": {"b": 2, "c": {"d": True}}, "e": "hello"} and data == {"a": {"b": 1}}
    assert parse_value("None") is None and parse_value("1e-3") == 1e-3 and parse_value("False") is False
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
