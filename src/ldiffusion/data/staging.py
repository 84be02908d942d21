"""Write a data set next to the old one and swap it in only when it is complete.

Every command that writes a data set folder (`data prepare FORMAT`, `data prepare qupath`,
`data synth`) goes through `open_output` and `commit`:

1. `open_output(out, writer=NAME, force=...)` checks `out` *before anything is written*:

   - missing or empty: used;
   - holds a data set written by the same command (`manifest.json` "converter" == NAME): replaced;
   - holds a data set written by another command or by hand: refused unless `force`;
   - holds anything else (no `dataset.json` / `manifest.json`): always refused.

   It then returns a `DatasetWriter` on a staging folder `out/.ldiffusion-staging-XXXX/`: inside
   `out`, so nothing is ever written outside the output folder and the final renames stay on one
   file system.
2. The command writes every sample and `dataset.json` / `manifest.json` into the staging folder.
3. `commit(writer)` swaps the entries `images/`, `labels/`, `instances/`, `dataset.json`,
   `manifest.json` into `out` by `os.rename` (the old ones first moved aside, `manifest.json`
   first, so that an interrupted swap never looks complete), then deletes the old ones. Other
   entries of `out` are left as they are. On any error during the swap it is rolled back.

A command that fails before `commit` leaves `out` exactly as it was: `staged(NAME)` wraps the
command so that its staging folders (and the folders it created for them) are deleted on any
exception, Ctrl-C included. Staging folders left by a killed process are deleted by the next
`open_output` on the same folder.

Example:
    >>> w = open_output(out, writer="synth")           # doctest: +SKIP
    >>> w.add("case1", image, label); w.finish(info)   # doctest: +SKIP
    >>> commit(w)                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ldiffusion.core.errors import InputError
from ldiffusion.core.io import read_json
from ldiffusion.data.format import DatasetWriter

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".ldiffusion-staging-"
OLD_PREFIX = ".ldiffusion-old-"
#: the entries of a data set folder that a writer owns, in the order they are swapped in.
OWNED = ("images", "labels", "instances", "dataset.json", "manifest.json")

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass
class _Scope:
    writer: str
    force: bool
    outputs: list[DatasetWriter] = dataclasses.field(default_factory=list)


_LOCAL = threading.local()


def _scopes() -> list[_Scope]:
    if not hasattr(_LOCAL, "scopes"):
        _LOCAL.scopes = []
    return _LOCAL.scopes


def written_by(out: str | os.PathLike[str]) -> str | None:
    """Name the command that wrote the data set in `out`.

    Returns:
        The "converter" of `manifest.json` ("monuseg", "qupath", "synth", ...); "synth" for a
        synthetic set from before the manifest named it; "" for a data set of unknown origin
        (hand-written `dataset.json`, unreadable manifest); None when `out` holds no data set.
    """
    out = Path(out)
    man_path, ds_path = out / "manifest.json", out / "dataset.json"
    if not man_path.exists() and not ds_path.exists():
        return None
    man: Any = {}
    with contextlib.suppress(OSError, ValueError, RecursionError):
        man = read_json(man_path) if man_path.is_file() else {}
    if isinstance(man, dict):
        if isinstance(man.get("converter"), str):
            return man["converter"]
        if man.get("generator") == "ldiffusion.data.synth":
            return "synth"
    return ""


def _entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if not p.name.startswith((STAGING_PREFIX, OLD_PREFIX))]


def check_output(out: str | os.PathLike[str], *, writer: str, force: bool = False) -> Path:
    """Refuse an output folder that `writer` may not replace (see the module docstring).

    Raises:
        InputError: `out` is a file; a non-empty folder holding no data set; or (without `force`)
            a data set written by another command. The message names the folder and the writer.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output path is a file; expected a folder")
    if not out.is_dir() or not _entries(out):
        return out
    who = written_by(out)
    if who is None:
        raise InputError(f"{out}: output folder is not empty and holds no data set (no dataset.json); "
                         "choose an empty or new folder")
    if who != writer and not force:
        origin = f"written by {who!r}" if who else "of unknown origin (its manifest.json names no converter)"
        raise InputError(f"{out}: holds a data set {origin}, not by {writer!r}; refusing to replace it "
                         "(choose another folder, or add --force to replace it)")
    return out


def open_output(out: str | os.PathLike[str], *, writer: str | None = None,
                force: bool | None = None) -> DatasetWriter:
    """Check `out` and return a `DatasetWriter` on a new staging folder inside it.

    Args:
        out: the data set folder to write (created when missing).
        writer: name recorded as "converter" in `manifest.json`; default: the enclosing
            `staged` command.
        force: allow replacing a data set written by another command; default: the enclosing
            `staged` command's `force` (False outside one).

    Returns:
        A writer whose `root` is the staging folder and whose `target` is `out`; pass it to
        `commit` once `writer.finish(...)` has written `dataset.json` and `manifest.json`.
    """
    scope = _scopes()[-1] if _scopes() else None
    name = writer or (scope.writer if scope else None)
    if name is None:
        raise TypeError("open_output needs writer=NAME outside a @staged command")
    out = check_output(out, writer=name, force=bool(force if force is not None else scope and scope.force))
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name.startswith((STAGING_PREFIX, OLD_PREFIX)) and p.is_dir():
            logger.warning("%s: removing %s left by an interrupted run", out, p.name)
            shutil.rmtree(p, ignore_errors=True)
    w = DatasetWriter(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    w.target = out  # type: ignore[attr-defined]
    w.created = created[::-1]  # type: ignore[attr-defined]  # outermost first
    w.committed = False  # type: ignore[attr-defined]
    if scope is not None:
        scope.outputs.append(w)
    return w


def discard(w: DatasetWriter) -> None:
    """Delete an uncommitted staging folder and the folders created for it (when left empty)."""
    if getattr(w, "committed", True):
        return
    shutil.rmtree(w.root, ignore_errors=True)
    for p in reversed(getattr(w, "created", [])):
        with contextlib.suppress(OSError):
            p.rmdir()  # only when empty
    w.committed = True  # type: ignore[attr-defined]


def commit(w: DatasetWriter) -> Path:
    """Swap the staged data set into its target folder (see the module docstring); return the target."""
    staging, out = w.root, Path(getattr(w, "target", w.root))
    if staging == out:
        return out
    old = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=out))
    moved: list[str] = []
    placed: list[str] = []
    try:
        for name in ("manifest.json", *OWNED[:-1]):
            if (out / name).exists() or (out / name).is_symlink():
                os.rename(out / name, old / name)
                moved.append(name)
        for name in OWNED:
            if (staging / name).exists():
                os.rename(staging / name, out / name)
                placed.append(name)
    except BaseException:
        for name in reversed(placed):
            with contextlib.suppress(OSError):
                os.rename(out / name, staging / name)
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(old / name, out / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    w.committed = True  # type: ignore[attr-defined]
    w.root = out
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def staged(name: str) -> Callable[[F], F]:
    """Decorate a data set writer so that a failure leaves its output folder untouched.

    The decorated function takes an extra keyword `force` (default False, see `check_output`);
    `open_output` calls inside it use `name` and `force`, and their staging folders are deleted
    when the function raises (or returns without committing).
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, force: bool = False, **kwargs: Any) -> Any:
            scope = _Scope(name, bool(force))
            _scopes().append(scope)
            try:
                return fn(*args, **kwargs)
            finally:
                _scopes().remove(scope)
                for w in scope.outputs:
                    discard(w)

        return run  # type: ignore[return-value]

    return deco
