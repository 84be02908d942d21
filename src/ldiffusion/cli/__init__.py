"""The `ldiffusion` command line: one module per subcommand, wired together here.

`main(argv)` runs the app in-process (tests call it directly) and returns the exit code:
0 on success, 2 for an `LDiffusionError` (bad input, printed as one line), 1 otherwise.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys

import click
import typer
import typer.core
import typer.main

from ldiffusion.cli import data as data_cmd
from ldiffusion.cli import evaluate as evaluate_cmd
from ldiffusion.cli._common import version_text
from ldiffusion.core.errors import LDiffusionError

app = typer.Typer(
    name="ldiffusion",
    help="Diffusion models for pathology image segmentation (L-Diffusion, LDSeg, cDAL).\n\n"
    "Example: ldiffusion train --method ldseg --data data/monuseg --out runs/ldseg-monuseg --preset small",
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


_LIST_TYPE = re.compile(r"^<list\[(.+)\]>$")


def _polish(command: click.Command, help_names: list[str]) -> None:
    """Apply the help conventions to `command` and its subcommands, in place.

    A flag (`--resume`, `--tissue/--no-tissue`, `--help`) shows no value type (not `<bool>`); an
    option that may be given several times shows its element type (`<str>`, not `<list[str]>`) and
    says "(repeatable)".
    """
    ctx = command.context_class(command, help_option_names=help_names)
    for param in command.get_params(ctx):  # includes the --help option, which click builds lazily
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "multiple", False) and isinstance(param, click.Option | typer.core.TyperOption):
            shown = param.display_type(ctx) if hasattr(param, "display_type") else ""
            match = _LIST_TYPE.match(shown)
            if param.metavar is None and match:
                param.metavar = f"<{match.group(1)}>"
            if "repeatable" not in (param.help or ""):
                param.help = f"{param.help or ''} (repeatable)".strip()
    for sub in getattr(command, "commands", {}).values():
        _polish(sub, help_names)


def command() -> click.Command:
    """Return the click command of `app` with the help conventions of `_polish` applied."""
    cmd = typer.main.get_command(app)
    _polish(cmd, app.info.context_settings["help_option_names"])
    return cmd


_EXIT = tuple({click.exceptions.Exit, typer.Exit})  # typer >= 0.2x carries its own copy of click
_ABORT = tuple({click.exceptions.Abort, typer.Abort})
_USAGE = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default `sys.argv[1:]`) and return the exit code."""
    try:
        rc = command().main(args=argv, prog_name="ldiffusion", standalone_mode=False)
    except LDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _EXIT as e:
        return int(e.exit_code or 0)
    except _ABORT:
        print("aborted", file=sys.stderr)
        return 130
    except _USAGE as e:
        if hasattr(e, "show"):
            e.show()
        else:
            print(f"Error: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
