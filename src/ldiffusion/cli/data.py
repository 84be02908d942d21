"""`ldiffusion data ...`: prepare, check and synthesise data sets.

Each subcommand lives in its own module (`data_prepare`, `data_check`, `data_synth`, ...) and exposes
`register(app)`.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="Prepare, check and synthesise data sets in the ldiffusion format.", no_args_is_help=True)

for _name in ("data_prepare", "data_check", "data_synth", "data_export"):
    try:
        importlib.import_module(f"ldiffusion.cli.{_name}").register(app)
    except ModuleNotFoundError as _e:
        if _e.name != f"ldiffusion.cli.{_name}":
            raise
