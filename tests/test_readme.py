"""README.md: its size, its links, and its quick-start block run end to end on the synthetic set.

The block marked `<!-- quick-start: ... -->` is the MoNuSeg tour. Run here in a temporary folder, in-process,
with these substitutions so that it takes seconds: `data prepare monuseg SRC OUT` becomes
`data synth OUT --n 12 --size 64`, the MoNuSeg test images are the synthetic images, `train` uses
`--preset tiny --set steps=2`, and `view` (a server that runs until Ctrl+C) is checked by its `--help` and by
the folder it is given. Every other word of every command is the README's.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from ldiffusion.cli import main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MONUSEG_SRC = "../shared/data/monuseg"
MONUSEG_TEST_IMAGES = "../shared/data/monuseg/test/Tissue Images"


def quick_start(text: str) -> list[list[str]]:
    """Return the commands of the fenced block after the `<!-- quick-start` marker, one word list each."""
    m = re.search(r"<!-- quick-start:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no <!-- quick-start: ... --> block"
    joined = m.group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [words for words in commands if words]


def test_readme_is_small_and_links_every_doc():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 12_000
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{doc.name}" in text, f"README.md does not link docs/{doc.name}"
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).is_file(), link


def _adapt(words: list[str], data: str) -> list[str] | None:
    """The README command `words` as the test runs it (see the module docstring); None: not run."""
    if words[:3] == ["ldiffusion", "data", "prepare"]:
        assert words[3:5] == ["monuseg", MONUSEG_SRC], words
        return ["ldiffusion", "data", "synth", words[5], "--n", "12", "--size", "64", "--seed", "0"]
    if words[0] == "python":
        return [w.replace(MONUSEG_TEST_IMAGES, f"{data}/images") for w in words]
    if words[:2] == ["ldiffusion", "train"]:
        i = words.index("--preset")
        return [*words[:i + 1], "tiny", *words[i + 2:], "--set", "steps=2", "--set", "val_every=2",
                "--device", "cpu", "--no-progress"]
    if words[:2] in (["ldiffusion", "predict"], ["ldiffusion", "slide"]):
        return [*words, "--device", "cpu", "--no-progress"]
    if words[:2] == ["ldiffusion", "evaluate"]:
        return [*words, "--no-progress"]
    if words[:2] == ["ldiffusion", "view"]:
        return None
    return words


@pytest.mark.e2e
def test_quick_start_runs_on_the_synthetic_set(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tiffslide")  # slide predict reads the stitched TIFF (extra 'slides')
    commands = quick_start(README.read_text(encoding="utf-8"))
    names = [" ".join(w[:3]) for w in commands]
    for step in ("ldiffusion data prepare", "ldiffusion train --method", "ldiffusion predict runs/unet",
                 "ldiffusion slide predict", "ldiffusion view slide_out/monuseg_test_slide"):
        assert any(n.startswith(step) or step.startswith(n) for n in names), step
    data = next(w[5] for w in commands if w[:3] == ["ldiffusion", "data", "prepare"])
    monkeypatch.chdir(tmp_path)
    for words in commands:
        run = _adapt(words, data)
        if run is None:  # `ldiffusion view DIR`: the folder it shows exists, and the command is there
            assert (tmp_path / words[2] / "done.json").is_file(), words
            assert main(["view", "--help"]) == 0
        elif run[0] == "python":
            monkeypatch.setattr(sys, "argv", [run[1], *run[2:]])
            runpy.run_path(str(REPO / run[1]), run_name="__main__")
        else:
            assert run[0] == "ldiffusion"
            rc = main(run[1:])
            assert rc == 0, f"{shlex.join(run)} -> exit {rc}: {capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "runs/unet/metrics-test.json").is_file()
    assert (tmp_path / "slide_out/monuseg_test_slide/annotations.geojson").is_file()
