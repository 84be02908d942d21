"""Preset lookup shared by the net modules (each module owns its own preset table)."""

from __future__ import annotations

import copy
from typing import Any

from ldiffusion.core.errors import ConfigError
from ldiffusion.core.registry import suggest

__all__ = ["lookup_preset"]


def lookup_preset(table: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """Return a deep copy of ``table[name]``, or raise `ConfigError` listing the defined presets.

    Example:
        >>> lookup_preset({"tiny": {"base": 8}}, "unet", "tiny")
        {'base': 8}
    """
    if name not in table:
        names = sorted(table)
        raise ConfigError(
            f"{kind} preset={name!r} is not defined; choose one of {names}{suggest(name, names)}"
        )
    return copy.deepcopy(table[name])
