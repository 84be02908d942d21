"""Shared pieces of the converters: the `CONVERTERS` registry, output folder handling, manifests.

A converter is a function `convert(src, out, *, seed=0, progress=True, **options) -> DatasetInfo`
that reads a public release in its own layout and writes the standard layout of
`ldiffusion.data.format` through `DatasetWriter` (`dataset.json`, then `manifest.json` last).

The manifest records the converter name and version, the effective options (every keyword of
the converter's signature, defaults included, plus the seed) and a fingerprint of the source
folder (relative paths and sizes), so that `ldiffusion data prepare` can skip a conversion that
is already complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldiffusion.core.errors import ConfigError, DatasetFormatError, InputError
from ldiffusion.core.registry import Registry
from ldiffusion.data.format import (
    IMAGE_SUFFIXES,
    DatasetInfo,
    DatasetWriter,
    find_images,
    read_image,
    read_mask,
)
from ldiffusion.data.staging import commit, open_output, staged

logger = logging.getLogger(__name__)

ConverterFn = Callable[..., DatasetInfo]

CONVERTERS: Registry[ConverterFn] = Registry("data format")

#: keywords of a converter that are not options (they do not change the output).
NON_OPTIONS = ("src", "out", "progress")

T = TypeVar("T")


def option_names(fn: ConverterFn) -> list[str]:
    """Return the option keywords of converter `fn` (seed included)."""
    return [p for p in inspect.signature(fn).parameters if p not in NON_OPTIONS]


def effective_options(fn: ConverterFn, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Return every option of `fn` with its value: given ones, else the signature default.

    Raises:
        ConfigError: an option that `fn` does not take (the valid ones are listed).
    """
    sig = inspect.signature(fn)
    valid = option_names(fn)
    for k in options:
        if k not in valid:
            from ldiffusion.core.registry import suggest

            raise ConfigError(f"option {k!r} is not known to this converter; valid options are "
                              f"{[v for v in valid if v != 'seed']}{suggest(k, valid)}")
    out: dict[str, Any] = {}
    for name in valid:
        if name == "seed":
            out[name] = int(seed)
        elif name in options:
            out[name] = options[name]
        else:
            default = sig.parameters[name].default
            out[name] = None if default is inspect.Parameter.empty else default
    return json.loads(json.dumps(out, default=str))


def same_options(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Compare option dicts loosely (`1` equals `"1"`), as options may arrive as strings."""
    return a.keys() == b.keys() and all(str(a[k]) == str(b[k]) for k in a)


def source_fingerprint(src: str | Path) -> str:
    """Return a SHA-256 over the relative paths and sizes of all files under `src` (stat only)."""
    src = Path(src)
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for p in files:
        rel = p.name if p == src else p.relative_to(src).as_posix()
        h.update(f"{rel}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def check_src(src: str | Path, what: str) -> Path:
    """Return `src` as a Path; raise `InputError` naming it when it is not a folder."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: source folder not found; expected the {what} release folder")
    return src


def prepare_out(out: str | Path) -> DatasetWriter:
    """Check `out` and return a `DatasetWriter` on a staging folder inside it (see `data.staging`).

    Nothing in `out` changes until `finish` swaps the complete data set in: a conversion that
    fails leaves `out` as it was. `out` may be missing, empty, or hold a data set written by the
    same converter; a data set written by another command is replaced only with `force=True`
    (given to the converter), and any other non-empty folder is refused.

    Raises:
        InputError: `out` is a file, a non-empty folder that is not a data set, or a data set of
            another command without `force`.
    """
    return open_output(out)


def register(name: str) -> Callable[[ConverterFn], ConverterFn]:
    """Register converter `name` in `CONVERTERS`, wrapped by `staged(name)`.

    The wrapped converter takes the extra keyword `force` (replace a data set written by another
    command) and removes its staging folder when it fails, so `out` is left untouched.
    """

    def deco(fn: ConverterFn) -> ConverterFn:
        return CONVERTERS.register(name)(staged(name)(fn))

    return deco


def finish(writer: DatasetWriter, info: DatasetInfo, *, converter: str, version: int, src: Path,
           options: dict[str, Any], extra: dict[str, Any] | None = None) -> DatasetInfo:
    """Check that every split id was written, write the json files, swap into `out`."""
    where = getattr(writer, "target", writer.root)
    written = set(writer.ids)
    listed = [i for ids in info.splits.values() for i in ids]
    missing = sorted(set(listed) - written)
    if missing:
        raise DatasetFormatError(f"{where}: split ids {missing[:5]} were never written")
    unlisted = sorted(written - set(listed))
    if unlisted:
        raise DatasetFormatError(f"{where}: written ids {unlisted[:5]} are in no split")
    manifest = {
        "converter": converter,
        "converter_version": version,
        "options": options,
        "source": str(Path(src).resolve()),
        "source_fingerprint": source_fingerprint(src),
        "counts": {k: len(v) for k, v in info.splits.items()},
        **(extra or {}),
    }
    writer.finish(info, manifest)
    commit(writer)
    logger.info("%s: wrote %d images (%s) to %s", converter, len(writer.ids),
                ", ".join(f"{k} {len(v)}" for k, v in info.splits.items()), writer.root)
    return info


@contextlib.contextmanager
def progress_bar(items: Iterable[T], *, desc: str, progress: bool,
                 total: int | None = None) -> Iterator[Iterable[T]]:
    """Yield `items` wrapped in a tqdm bar on stderr (no bar when `progress` is False)."""
    with logging_redirect_tqdm():
        bar = tqdm(items, desc=desc, total=total, disable=not progress, unit="img", leave=False)
        try:
            yield bar
        finally:
            bar.close()


def find_file(folder: Path, stem: str, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> Path | None:
    """Return `folder/<stem><suffix>` for the first of `suffixes` found (case-insensitive), else None."""
    if not folder.is_dir():
        return None
    names = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    for sfx in suffixes:
        hit = names.get(f"{stem}{sfx}".lower())
        if hit is not None:
            return hit
    return None


def image_mask_folders(src: Path, layout: str) -> tuple[list[Path], Path]:
    """Return the images of `src/images` (sorted) and the folder `src/masks`; raise if either is missing
    (naming `layout`, what was expected) or if there is no image."""
    img_dir, mask_dir = src / "images", src / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetFormatError(f"{src}: expected {layout}")
    images = find_images(img_dir)
    if not images:
        raise DatasetFormatError(f"{img_dir}: no images found")
    return images, mask_dir


def find_mask(image_path: Path, mask_dir: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES, *,
              what: str = "mask", hint: str = "") -> Path:
    """Return the file of `mask_dir` with the stem of `image_path`; raise naming the expected file if none."""
    path = find_file(mask_dir, image_path.stem, suffixes)
    if path is None:
        raise DatasetFormatError(f"{image_path}: no {what} found; expected "
                                 f"{mask_dir}/{image_path.stem}.png{hint}")
    return path


def check_shape(mask: np.ndarray, mask_path: Path, image: np.ndarray, image_path: Path,
                what: str = "mask") -> None:
    """Raise naming both files when `mask` (H, W) does not have the size of `image` (H, W, 3)."""
    if mask.shape != image.shape[:2]:
        raise DatasetFormatError(f"{mask_path}: {what} shape {mask.shape} != image shape {image.shape[:2]} "
                                 f"of {image_path}")


def read_pair(image_path: Path, mask_dir: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES, *,
              what: str = "mask") -> tuple[np.ndarray, np.ndarray, Path]:
    """Read an image and the mask of the same stem in `mask_dir`, checked to be of the same size.

    Returns:
        `(image, raw, mask_path)`: the image (H, W, 3) uint8, the mask's values (H, W) as stored.
    """
    mask_path = find_mask(image_path, mask_dir, suffixes, what=what)
    image = read_image(image_path)
    raw = read_mask(mask_path)
    check_shape(raw, mask_path, image, image_path, what)
    return image, raw, mask_path


def apply_lut(values: np.ndarray, lut: np.ndarray, path: Path, valid: str) -> np.ndarray:
    """Map integer `values` through `lut` (-1 = invalid); raise naming `path` on a bad value."""
    vals = np.asarray(values)
    bad_hi = vals.max(initial=0) >= len(lut) or vals.min(initial=0) < 0
    if bad_hi:
        v = int(vals.max()) if vals.max(initial=0) >= len(lut) else int(vals.min())
        raise DatasetFormatError(f"{path}: mask value {v} is not valid; expected {valid}")
    out = lut[vals]
    if (out < 0).any():
        v = int(vals[out < 0][0])
        raise DatasetFormatError(f"{path}: mask value {v} is not valid; expected {valid}")
    return out.astype(np.uint8)


def parse_int_list(value: Any, what: str) -> list[int]:
    """Parse `1`, `"1"`, `"1,2"` or `[1, 2]` into a list of ints (ConfigError naming `what`)."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [s for s in str(value).replace(";", ",").split(",") if s.strip()]
    try:
        return [int(str(x).strip()) for x in items]
    except ValueError as e:
        raise ConfigError(f"option {what}={value!r} should be an integer or a comma list of integers") from e


def as_float(value: Any, what: str) -> float:
    """Parse a float option (ConfigError naming `what`)."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"option {what}={value!r} should be a number") from e


def as_amount(value: Any, what: str) -> int | float:
    """Parse a split size: an int (number of groups) or a float fraction such as 0.15."""
    if isinstance(value, bool):
        raise ConfigError(f"option {what}={value!r} should be a group count or a fraction")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return as_float(text, what)


def collect_options(local_vars: dict[str, Any]) -> dict[str, Any]:
    """Return the options of a converter call from its `locals()` at entry (JSON-normalised)."""
    opts = {k: v for k, v in local_vars.items() if k not in NON_OPTIONS}
    return json.loads(json.dumps(opts, default=str))


def groups_from_prefix(ids: Iterable[str], sep: str = "_", n_fields: int = 2) -> dict[str, str]:
    """Map each id to the first `n_fields` fields of its name split at `sep`."""
    return {i: sep.join(i.split(sep)[:n_fields]) for i in ids}


def read_rgb_mask(path: Path) -> np.ndarray:
    """Read a colour-coded mask as (H, W, 3) uint8 RGB (palette expanded, alpha dropped)."""
    from PIL import Image

    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(str(path)))
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            return np.ascontiguousarray(arr[..., :3].astype(np.uint8))
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise InputError(f"{path}: cannot read mask ({e})") from e


def rgb_to_int(arr: np.ndarray) -> np.ndarray:
    """Pack (H, W, 3) uint8 RGB into (H, W) int32 R*65536 + G*256 + B."""
    a = arr.astype(np.int32)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def map_colours(rgb: np.ndarray, table: dict[tuple[int, int, int], int], path: Path,
                unknown: int | None = None) -> np.ndarray:
    """Map each RGB colour of `rgb` to its class id in `table`.

    Args:
        rgb: (H, W, 3) uint8.
        table: colour -> id.
        path: file named in errors.
        unknown: id for colours not in `table`; None raises instead.

    Raises:
        DatasetFormatError: a colour not in `table` (names the file, the colour and its pixel count).
    """
    packed = rgb_to_int(rgb)
    out = np.full(packed.shape, -1, dtype=np.int32)
    for col, v in table.items():  # a few comparisons are much cheaper than np.unique on 1M pixels
        r, g, b = (int(x) for x in col)
        out[packed == (r << 16 | g << 8 | b)] = v
    bad = out < 0
    if bad.any():
        if unknown is not None:
            out[bad] = unknown
        else:
            u = int(packed[bad][0])
            col = (u >> 16 & 255, u >> 8 & 255, u & 255)
            n = int((packed == u).sum())
            known = sorted(tuple(int(x) for x in c) for c in table)
            more = f" and {len(known) - 8} more" if len(known) > 8 else ""
            raise DatasetFormatError(f"{path}: unknown colour RGB{col} ({n} px); expected a colour of "
                                     f"the class table: {known[:8]}{more}")
    return out
