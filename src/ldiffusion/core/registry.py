"""A small name -> constructor registry with "did you mean" errors (timm style, immutable after import)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ldiffusion.core.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """Return a " (did you mean 'x'?)" suffix for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Map lowercase names to objects; filled by our own modules at import time.

    Example:
        >>> r: Registry[int] = Registry("number")
        >>> _ = r.register("one")(1)
        >>> r.get("one")
        1
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under `name`."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the entry for `name`, or raise `ConfigError` listing the valid names."""
        if name not in self._items:
            names = self.names()
            raise ConfigError(
                f"{self.kind}={name!r} is not registered; choose one of {names}{suggest(name, names)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
