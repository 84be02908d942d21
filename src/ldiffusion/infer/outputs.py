"""Where prediction outputs may go: path checks, ownership of existing files, memory bounds.

Every writer of `predict` and `slide predict` builds its destination with `output_path`, which
refuses a name that is not one plain path component and any path that resolves outside the output
folder. `check_out_dir` refuses an output folder that holds the inputs (or a data set's images or
labels), and `claim_outputs` refuses to replace a file that an earlier `predict` did not write
(unless `overwrite`). `check_bytes` turns an allocation that would exceed the memory limit into an
`InputError` that states the figure, before anything is allocated.

Example:
    >>> output_path("/tmp/out", "case_1.png").name
    'case_1.png'
    >>> output_path("/tmp/out", "../victim.png")
    Traceback (most recent call last):
    ...
    ldiffusion.core.errors.InputError: output name '../victim.png' is not valid: ...
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ldiffusion.core.errors import InputError
from ldiffusion.core.io import read_json, write_json

logger = logging.getLogger(__name__)

#: default memory limit of one allocation of the prediction commands (bytes)
DEFAULT_MAX_BYTES = 8 * 1024**3
#: file in a `predict --out` folder listing the files `predict` wrote there
PREDICT_MANIFEST = "predict.json"
#: data set sub-folders that must never receive predictions
DATASET_FOLDERS = ("images", "labels", "instances")


def name_problem(name: str) -> str | None:
    """Return why `name` cannot be one file-name component (None when it can).

    A valid name is non-empty, has no path separator (`/` or `\\`), no NUL, is not `.` or `..`
    and is not absolute (no drive letter either).
    """
    if not isinstance(name, str) or not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if "\x00" in name:
        return "it contains a NUL character"
    if name in (".", ".."):
        return "it is '.' or '..'"
    if os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return "it is an absolute path"
    return None


def check_case_id(case_id: str, source: str | Path) -> str:
    """Return `case_id` if it is a valid id (one file-name component), else raise naming `source`.

    Uses the data set contract's own check (`ldiffusion.data.format.id_problem`) when present,
    plus the local file-name check (absolute paths, drive letters).

    Raises:
        InputError: the id is empty, contains a separator, is `..` or absolute.
    """
    problem = name_problem(case_id)
    if problem is None:
        try:  # the data contract's check, when this version of data/format.py has one
            from ldiffusion.data.format import id_problem
        except ImportError:  # pragma: no cover - older data/format.py
            id_problem = None
        problem = id_problem(case_id) if id_problem is not None else None
    if problem is None:
        return case_id
    raise InputError(
        f"{source}: id {case_id!r} is not valid: {problem}; an id must be one file-name "
        "component (no '/', '\\', '..', not absolute)"
    )


def output_path(out_dir: str | Path, name: str) -> Path:
    """Return `out_dir / name` after checking that it stays inside `out_dir`.

    Args:
        out_dir: output folder.
        name: file or folder name (one component, e.g. `"<id>.png"`).

    Raises:
        InputError: `name` is not one plain component, or the path resolves (through a symbolic
            link) outside `out_dir`.
    """
    problem = name_problem(name)
    if problem is not None:
        raise InputError(f"output name {name!r} is not valid: {problem}; refusing to write outside {out_dir}")
    out = Path(out_dir)
    path = out / name
    root = out.resolve()
    if not path.resolve().is_relative_to(root):
        raise InputError(f"{path}: resolves to {path.resolve()}, outside the output folder {root}; refusing")
    return path


def check_out_dir(
    out_dir: str | Path,
    inputs: Iterable[str | Path] = (),
    data_root: str | Path | None = None,
    option: str = "--out",
) -> Path:
    """Refuse an output folder that is a file, holds an input, or is (inside) a data set's pixel folders.

    Args:
        out_dir: output folder (need not exist).
        inputs: input files that must not lie directly in `out_dir` (where the outputs go).
        data_root: prepared data set read by the command (its root, images/, labels/ and
            instances/ may not receive outputs).
        option: option name used in messages.

    Returns:
        `out_dir` as a Path.

    Raises:
        InputError: naming the folder and the input it would overwrite.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out}: exists and is not a folder; give a folder")
    root = out.resolve()
    if data_root is not None:
        data = Path(data_root).resolve()
        for p in (data, *(data / f for f in DATASET_FOLDERS)):
            if root == p or (p != data and root.is_relative_to(p)):
                raise InputError(
                    f"{option} {out}: is {'inside ' if root != p else ''}the data set folder {p}; "
                    "predictions would overwrite or mix with the data set, choose another folder"
                )
    for item in inputs:
        p = Path(item).resolve()
        if p.parent == root:
            raise InputError(
                f"{option} {out}: holds the input {item}; predictions would overwrite the inputs, "
                "choose another folder"
            )
    return out


def claim_outputs(out_dir: str | Path, names: Sequence[str], *, overwrite: bool = False) -> Path:
    """Record in `out_dir/predict.json` that `names` are written by `predict`, refusing foreign files.

    A file that exists and is not listed in the folder's manifest (so was not written by an
    earlier `predict`) is refused unless `overwrite`. The names are recorded *before* anything is
    written, so a run interrupted half-way can be rerun into the same folder.

    Returns:
        The manifest path.

    Raises:
        InputError: naming the first foreign file and how many there are.
    """
    out = Path(out_dir)
    manifest = output_path(out, PREDICT_MANIFEST)
    owned: list[str] = []
    if manifest.is_file():
        try:
            data = read_json(manifest)
            owned = [str(n) for n in data.get("files", [])] if isinstance(data, dict) else []
        except ValueError:
            owned = []
    owned_set = set(owned)
    paths = [output_path(out, n) for n in names]
    foreign = [p for p, n in zip(paths, names, strict=True) if n not in owned_set and os.path.lexists(p)]
    if foreign and not overwrite:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise InputError(
            f"{foreign[0]}: exists and was not written by `ldiffusion predict`{more}; pass --overwrite "
            "to replace it, or choose another --out"
        )
    new = [n for n in names if n not in owned_set]
    if new or not manifest.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json(manifest, {"written_by": "ldiffusion predict", "files": owned + new})
    return manifest


def format_bytes(n: float) -> str:
    """Format a byte count with a binary unit (`"37.3 GiB"`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - unreachable


def check_bytes(nbytes: float, what: str, max_bytes: float | None, hint: str = "") -> None:
    """Raise before allocating `nbytes` for `what` when it exceeds `max_bytes` (None = no limit).

    Raises:
        InputError: `"<what> would need 37.3 GiB; limit 8.0 GiB (--max-memory)<hint>"`.
    """
    if max_bytes is not None and nbytes > max_bytes:
        raise InputError(
            f"{what} would need {format_bytes(nbytes)}; limit {format_bytes(max_bytes)} "
            f"(--max-memory){'; ' + hint if hint else ''}"
        )


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(run_dir: str | Path, overrides: Sequence[str] = ()) -> str:
    """Return a fingerprint of a run folder's model: sha256 of `model.safetensors` + `config.json`
    and of the inference-time `key=value` overrides (none: the fingerprint of the files alone).

    Files that are missing are left out (the model loader reports them).
    """
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        p = Path(run_dir) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + file_sha256(p).encode())
    for item in overrides:
        h.update(b"set\0" + str(item).encode() + b"\0")
    return h.hexdigest()


def module_fingerprint(model: Any) -> str | None:
    """Return a sha256 of a torch module's state dict (names, shapes, bytes), or None for other objects."""
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        return None
    import torch

    h = hashlib.sha256()
    for key, value in state_dict().items():
        arr = value.detach().cpu().contiguous()
        h.update(f"{key}:{arr.dtype}:{tuple(arr.shape)}".encode())
        if arr.numel():
            h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = [
    "DEFAULT_MAX_BYTES",
    "PREDICT_MANIFEST",
    "check_bytes",
    "check_case_id",
    "check_out_dir",
    "claim_outputs",
    "file_sha256",
    "format_bytes",
    "module_fingerprint",
    "name_problem",
    "output_path",
    "run_fingerprint",
]
