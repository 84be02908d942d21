"""`ldiffusion data prepare FORMAT SRC OUT`: convert a public data set into the ldiffusion format."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import typer

from ldiffusion.cli._common import PROGRESS, SEED
from ldiffusion.core.config import parse_value
from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.io import read_json
from ldiffusion.data.converters import CONVERTERS, effective_options
from ldiffusion.data.converters._common import same_options, source_fingerprint
from ldiffusion.data.format import DatasetInfo, read_dataset_info

logger = logging.getLogger(__name__)


def parse_options(items: list[str] | None) -> dict[str, object]:
    """Turn `["key=value", ...]` into a dict (values parsed as JSON where they parse)."""
    out: dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--option {item!r} should look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def is_done(out: Path, fmt: str, options: dict[str, object], src: Path) -> bool:
    """True when `out/manifest.json` records the same converter, options and source files."""
    path = out / "manifest.json"
    if not path.is_file() or not (out / "dataset.json").is_file():
        return False
    try:
        man = read_json(path)
    except ValueError:
        return False
    version = getattr(importlib.import_module(CONVERTERS.get(fmt).__module__), "VERSION", None)
    return (isinstance(man, dict) and man.get("converter") == fmt
            and man.get("converter_version") == version
            and isinstance(man.get("options"), dict) and same_options(man["options"], options)
            and man.get("source_fingerprint") == source_fingerprint(src))


def summary(info: DatasetInfo) -> str:
    """Return a short text summary: counts per split (and part) and the class table."""
    lines = [f"{info.name}: task {info.task}, mpp {info.mpp}"]
    lines.append("splits: " + ", ".join(f"{k} {len(v)}" for k, v in info.splits.items()))
    if info.parts:
        lines.append("parts: " + ", ".join(f"{k} {len(v)}" for k, v in info.parts.items()))
    lines.append("classes: " + ", ".join(f"{c.id}={c.name}" for c in info.classes))
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add the `prepare` command to the `data` group `app`."""
    choices = ", ".join(CONVERTERS.names())

    @app.command("prepare", help=f"Convert a public data set into the ldiffusion format. FORMAT: {choices}.")
    def prepare(
        fmt: str = typer.Argument(..., metavar="FORMAT", help=f"Source format, one of: {choices}."),
        src: Path = typer.Argument(..., help="Folder of the downloaded release."),
        out: Path = typer.Argument(..., help="Output folder (created; a previous conversion is replaced)."),
        seed: int = SEED,
        option: list[str] = typer.Option(None, "--option", "-o",
                                         help="Converter option key=value (repeatable), e.g. taxonomy=morph.",
                                         ),
        force: bool = typer.Option(False, "--force", help="Convert again even if OUT is up to date."),
        progress: bool = PROGRESS,
    ) -> None:
        fn = CONVERTERS.get(fmt)
        opts = parse_options(option)
        effective = effective_options(fn, seed, **opts)
        if not src.is_dir():
            raise InputError(f"SRC {src}: folder not found; give the folder of the {fmt} release")
        if not force and is_done(out, fmt, effective, src):
            print(f"{out}: already prepared by {fmt!r} with the same options and source; "
                  "skipping (use --force to convert again)")
            print(summary(read_dataset_info(out)))
            return
        info = fn(src, out, seed=seed, progress=progress, **opts)
        print(f"prepared {fmt!r} -> {out}")
        print(summary(info))
