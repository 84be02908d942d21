"""`--help` of every command: method choices, flags without a value type, repeatable options, an example."""

from __future__ import annotations

import click
import pytest

from ldiffusion.cli import command, main
from ldiffusion.cli._common import METHOD_NAMES


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps help at the terminal width; keep lines whole


def _help(capsys, *words: str) -> str:
    assert main([*words, "--help"]) == 0
    return capsys.readouterr().out


def _command_paths(cmd: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        paths += _command_paths(sub, (*prefix, name))
    return paths


def test_method_names_are_the_registry():
    from ldiffusion.methods import METHODS

    assert sorted(METHOD_NAMES) == METHODS.names()


def test_train_help_lists_the_five_methods(capsys):
    out = _help(capsys, "train")
    line = next(ln for ln in out.splitlines() if "--method " in ln and "Example" not in ln)
    for name in ("unet", "ldiffusion", "ldseg", "cdal", "autoencoder"):
        assert name in line, (name, line)


def test_unknown_method_exits_2_with_a_suggestion(tmp_path, capsys):
    rc = main(["train", "--method", "ldsge", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "did you mean 'ldseg'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unknown_option_is_a_usage_error_not_a_traceback(capsys):
    assert main(["train", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err


def test_flags_show_no_value_type_and_repeatable_options_say_so(capsys):
    out = _help(capsys, "train")
    resume = next(ln for ln in out.splitlines() if "--resume " in ln)
    assert "<bool>" not in out and "<" not in resume
    set_line = next(ln for ln in out.splitlines() if "--set " in ln)
    assert "repeatable" in set_line and "list[" not in set_line
    prepare = _help(capsys, "data", "prepare")
    assert "<bool>" not in prepare
    slides = [ln for ln in prepare.splitlines() if ln.lstrip("│ ").startswith("--slides ")]
    assert slides and all("repeatable" in ln for ln in slides)


def test_every_command_help_has_an_example(capsys):
    paths = _command_paths(command())
    assert ("slide", "predict") in paths and ("data", "synth") in paths and ("train",) in paths
    for path in paths:
        out = _help(capsys, *path)
        assert "Example: ldiffusion " in out, " ".join(path) or "ldiffusion"
