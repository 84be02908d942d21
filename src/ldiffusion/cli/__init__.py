"""The `ldiffusion` command line: one module per subcommand, wired together here.

`main(argv)` runs the app in-process (tests call it directly) and returns the exit code:
0 on success, 2 for an `LDiffusionError` (bad input, printed as one line), 1 otherwise.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click
import typer

from ldiffusion.cli import data as data_cmd
from ldiffusion.cli import evaluate as evaluate_cmd
from ldiffusion.cli._common import version_text
from ldiffusion.core.errors import LDiffusionError

app = typer.Typer(
    name="ldiffusion",
    help="Diffusion models for pathology image segmentation (L-Diffusion, LDSeg, cDAL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the ldiffusion, Python and torch versions and exit."),
    log_level: str = typer.Option("INFO", "--log-level", help="Logging level: DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Diffusion models for pathology image segmentation."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


app.add_typer(data_cmd.app, name="data")
evaluate_cmd.register(app)

for _mod in ("train", "predict", "slide", "bench", "view"):
    try:  # each command module exposes register(app); a module not yet present is not offered
        importlib.import_module(f"ldiffusion.cli.{_mod}").register(app)
    except ModuleNotFoundError as _e:
        if _e.name != f"ldiffusion.cli.{_mod}":
            raise


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`) and return the exit code."""
    try:
        rc = app(args=argv, prog_name="ldiffusion", standalone_mode=False)
    except LDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as e:
        e.show()
        return 2
    return rc if isinstance(rc, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
