"""The on-disk data set contract: `dataset.json` plus `images/`, `labels/`, `instances/` folders.

Layout of a prepared data set (one folder)::

    dataset.json            {name, task, classes, ignore_index, mpp, splits, source, license,
                             [parts], [groups]}
    images/<id>.png         RGB uint8
    labels/<id>.png         uint8 class ids, 0 = background, `ignore_index` (255) = not annotated
    instances/<id>.png      uint16 instance ids, 0 = none (optional)
    manifest.json           written last by converters (converter name/version, counts)

`parts` (optional) maps a sub-split name to ids, e.g. GlaS {"testA": [...], "testB": [...]};
`groups` (optional) maps each id to its source group (slide, patient or release image) so that
splits can be checked for leakage.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ldiffusion.core.errors import DatasetFormatError, InputError
from ldiffusion.core.io import atomic_write_bytes, read_json, write_json

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".webp")

Task = Literal["semantic", "instance"]


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """One class of a data set: integer id, name and display colour (RGB)."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The parsed `dataset.json` of a prepared data set."""

    name: str
    task: Task
    classes: tuple[ClassInfo, ...]
    splits: dict[str, list[str]]
    ignore_index: int = 255
    mpp: float | None = None
    source: str = ""
    license: str = ""
    parts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    groups: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Class names in id order."""
        return [c.name for c in self.classes]

    @property
    def palette(self) -> np.ndarray:
        """Colours as a (K, 3) uint8 array indexed by class id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def ids(self, split: str) -> list[str]:
        """Return the ids of `split` (or of a part such as "testA"); raise when unknown."""
        if split in self.splits:
            return list(self.splits[split])
        if split in self.parts:
            return list(self.parts[split])
        if split == "all":
            return [i for s in SPLITS for i in self.splits.get(s, [])]
        valid = sorted([*self.splits, *self.parts, "all"])
        raise DatasetFormatError(f"split {split!r} not in dataset {self.name!r}; choose one of {valid}")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form written to `dataset.json`."""
        d: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "ignore_index": self.ignore_index,
            "mpp": self.mpp,
            "splits": {k: list(v) for k, v in self.splits.items()},
            "source": self.source,
            "license": self.license,
        }
        if self.parts:
            d["parts"] = {k: list(v) for k, v in self.parts.items()}
        if self.groups:
            d["groups"] = dict(self.groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "dataset.json") -> DatasetInfo:
        """Parse and validate the JSON form; every error names the file and the key (one line)."""
        if not isinstance(d, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object at the top level, got {_jtype(d)}")
        required = ["name", "task", "classes", "splits"]
        for k in required:
            if k not in d:
                raise DatasetFormatError(f"{where}: missing key {k!r}")
        known = {"name", "task", "classes", "ignore_index", "mpp", "splits", "source", "license",
                 "parts", "groups"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DatasetFormatError(f"{where}: unknown key {unknown[0]!r}; valid keys are {sorted(known)}")
        if d["task"] not in ("semantic", "instance"):
            raise DatasetFormatError(f"{where}: task={_short(d['task'])}; expected 'semantic' or 'instance'")
        for key in ("name", "source", "license"):
            if key in d and not isinstance(d[key], str):
                raise DatasetFormatError(f"{where}: {key}={_short(d[key])} should be a string")
        classes = _parse_classes(d["classes"], where)
        ignore = d.get("ignore_index", 255)
        if not _is_int(ignore) or not 0 <= ignore <= 255:
            raise DatasetFormatError(f"{where}: ignore_index={_short(ignore)} should be an integer in 0..255")
        if ignore < len(classes):
            raise DatasetFormatError(f"{where}: ignore_index={ignore} is also the id of class "
                                     f"{classes[ignore].name!r}; use a value >= {len(classes)} (e.g. 255)")
        mpp = d.get("mpp")
        if mpp is not None and (not isinstance(mpp, (int, float)) or isinstance(mpp, bool)
                                or not math.isfinite(mpp) or mpp <= 0):
            raise DatasetFormatError(f"{where}: mpp={_short(mpp)} should be a positive number "
                                     "(microns per pixel) or null")
        splits = _parse_id_lists(d["splits"], where, "splits")
        parts = _parse_id_lists(d.get("parts", {}), where, "parts")
        groups_raw = d.get("groups", {})
        if not isinstance(groups_raw, dict):
            raise DatasetFormatError(f"{where}: groups should map ids to group names, "
                                     f"got {_jtype(groups_raw)}")
        groups: dict[str, str] = {}
        for k, v in groups_raw.items():
            check_id(k, where=f"{where}: groups")
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise DatasetFormatError(f"{where}: groups[{k!r}]={_short(v)} should be a string")
            groups[k] = str(v)
        return cls(
            name=d["name"], task=d["task"], classes=classes, splits=splits, ignore_index=int(ignore),
            mpp=None if mpp is None else float(mpp), source=d.get("source", ""),
            license=d.get("license", ""), parts=parts, groups=groups,
        )


def _jtype(v: Any) -> str:
    """Name of the JSON type of `v` for messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 60) -> str:
    """`repr(v)` cut to `n` characters (values from files may be huge)."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: longest id in bytes (UTF-8): ids become file names, most file systems allow 255 bytes per name.
MAX_ID_BYTES = 200


def id_problem(case_id: Any) -> str | None:
    """Return why `case_id` cannot be a sample id, or None when it can.

    An id becomes a file name (`images/<id>.png`, prediction outputs, caches), so it must be one
    path component: a non-empty string (an integer is accepted and read as its decimal text),
    without '/', '\\' or NUL, not '.' or '..', at most `MAX_ID_BYTES` bytes in UTF-8.

    Example:
        >>> id_problem("case_01") is None, id_problem("../x")
        (True, "contains '/' (a path separator)")
    """
    if _is_int(case_id):
        case_id = str(case_id)
    if not isinstance(case_id, str):
        return f"is {_jtype(case_id)}, not a string"
    if not case_id:
        return "is empty"
    for ch, what in (("/", "a path separator"), ("\\", "a path separator"), ("\0", "a NUL character")):
        if ch in case_id:
            return f"contains {ch!r} ({what})"
    if case_id in (".", ".."):
        return "is a relative folder name, not a file name"
    if len(case_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def check_id(case_id: Any, where: str = "id") -> str:
    """Return `case_id` as a string when it is a safe sample id (see `id_problem`), else raise.

    Use it wherever an id from a file or the command line becomes part of a path.

    Args:
        case_id: the id (a string, or an integer read as its decimal text).
        where: prefix of the error, e.g. "data/x/dataset.json: split 'train'".

    Raises:
        DatasetFormatError: one line, "<where>: id '<id>' is not valid: <reason>; ...".
    """
    why = id_problem(case_id)
    if why is not None:
        raise DatasetFormatError(f"{where}: id {_short(case_id)} is not valid: it {why}; an id must be one "
                                 "file name (no '/', '\\', '..', NUL; not empty)")
    return str(case_id)


def _parse_classes(raw: Any, where: str) -> tuple[ClassInfo, ...]:
    if not isinstance(raw, list) or not raw:
        raise DatasetFormatError(f"{where}: classes should be a non-empty list of {{id, name, color}}, "
                                 f"got {_short(raw)}")
    out = []
    for k, c in enumerate(raw):
        at = f"{where}: classes[{k}]"
        if not isinstance(c, dict) or not {"id", "name", "color"} <= set(c):
            raise DatasetFormatError(f"{at}={_short(c)} should be an object with keys id, name, color")
        if not _is_int(c["id"]):
            raise DatasetFormatError(f"{at}.id={_short(c['id'])} should be an integer")
        if not isinstance(c["name"], str) or not c["name"]:
            raise DatasetFormatError(f"{at}.name={_short(c['name'])} should be a non-empty string")
        col = c["color"]
        if (not isinstance(col, list) or len(col) != 3
                or not all(_is_int(x) and 0 <= x <= 255 for x in col)):
            raise DatasetFormatError(f"{at}.color={_short(col)} should be [r, g, b] with integers in 0..255")
        out.append(ClassInfo(c["id"], c["name"], (col[0], col[1], col[2])))
    ids = [c.id for c in out]
    if ids != list(range(len(out))):
        raise DatasetFormatError(f"{where}: class ids must be 0..K-1 in order, got {_short(ids)}")
    return tuple(out)


def _parse_id_lists(raw: Any, where: str, key: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise DatasetFormatError(f"{where}: {key} should map names to lists of ids, got {_jtype(raw)}")
    out: dict[str, list[str]] = {}
    for name, ids in raw.items():
        if not isinstance(ids, list):
            raise DatasetFormatError(f"{where}: {key}[{name!r}] should be a list of ids, got {_short(ids)}")
        bad = [i for i in ids if id_problem(i) is not None]
        if bad:
            try:
                check_id(bad[0], where=f"{where}: {key[:-1]} {name!r}")
            except DatasetFormatError as e:
                more = f" ({len(bad) - 1} more invalid ids in this {key[:-1]})" if len(bad) > 1 else ""
                raise DatasetFormatError(f"{e}{more}") from None
        out[name] = [str(i) for i in ids]
    return out


def read_dataset_info(root: str | os.PathLike[str]) -> DatasetInfo:
    """Read `<root>/dataset.json`; raise `DatasetFormatError` naming the file when absent or bad."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetFormatError(f"{path}: not found; is {root} a prepared data set? "
                                 "(create one with `ldiffusion data prepare` or `data synth`)")
    try:
        d = read_json(path)
    except (OSError, ValueError, RecursionError) as e:
        msg = str(e) if str(path) in str(e) else f"{path}: cannot read ({type(e).__name__}: {e})"
        raise DatasetFormatError(msg.splitlines()[0] if msg else str(path)) from e
    return DatasetInfo.from_dict(d, where=str(path))


def write_dataset_info(root: str | os.PathLike[str], info: DatasetInfo) -> None:
    """Write `<root>/dataset.json` atomically."""
    write_json(Path(root) / "dataset.json", info.to_dict())


# ---------------------------------------------------------------- image I/O


def read_image(path: str | os.PathLike[str], notes: list[str] | None = None) -> np.ndarray:
    """Read an RGB image of any common container (PNG, TIFF, BMP, JPEG, WebP) and pixel mode.

    Conversions (each one explicit; `notes` receives a line for the lossy ones, which
    `ldiffusion data check` prints as warnings):

    - grey, 1-bit, palette, YCbCr, LAB: converted to RGB (grey repeated to 3 channels);
    - alpha (RGBA, LA, PA, 2/4-channel TIFF): dropped; a note when some pixel is not opaque;
    - CMYK: converted to RGB (R = (255 - C) * (255 - K) / 255, ...), with a note;
    - 16-bit (PNG I;16, uint16 TIFF): scaled by the full 16-bit range, value // 257, the same
      for every image of a set; an image whose values all lie in 0..255 is 8-bit data in a
      16-bit container and keeps its values. A note gives the value range either way;
    - 32-bit integer with values in 0..65535: as 16-bit; float, signed or larger values: refused.

    Args:
        path: image file.
        notes: when given, receives one line per lossy conversion (without the file name).

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        InputError: the file is missing, cannot be decoded, or holds an unsupported pixel type
            (named with the file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    notes = [] if notes is None else notes
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff_rgb(path, notes)
        else:
            with Image.open(path) as im:
                arr = _pil_rgb(im, path, notes)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read image ({e})") from e
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or 0 in arr.shape:
        raise InputError(f"{path}: expected an RGB image, got array of shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3])


def _alpha_note(alpha: np.ndarray, notes: list[str]) -> None:
    top = 65535 if alpha.dtype == np.uint16 else 255
    n = int((alpha < top).sum())
    if n:
        notes.append(f"alpha channel dropped ({n} of {alpha.size} pixels not opaque)")


def _to_uint8(arr: np.ndarray, path: Path, notes: list[str]) -> np.ndarray:
    """Bring an integer array to uint8 (see `read_image`); raise naming `path` otherwise."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{path}: unsupported image pixel type {arr.dtype}; expected 8- or 16-bit integers "
                         "(convert float images to 8-bit first)")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise InputError(f"{path}: image values {lo}..{hi} do not fit 8 or 16 bits ({arr.dtype}); "
                         "convert it to 8-bit RGB first")
    if hi <= 255:
        notes.append(f"{arr.dtype} image with values {lo}..{hi}: read as 8-bit values")
        return arr.astype(np.uint8)
    notes.append(f"16-bit image with values {lo}..{hi}: scaled to 8-bit by value // 257")
    return (arr // 257).astype(np.uint8)


def _pil_rgb(im: Image.Image, path: Path, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode.startswith("I") or mode == "F":
        return _to_uint8(np.asarray(im), path, notes)
    if mode == "CMYK":
        notes.append("CMYK image converted to RGB")
        return np.asarray(im.convert("RGB"))
    if "A" in mode or "a" in mode or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        _alpha_note(np.asarray(rgba)[..., 3], notes)
        return np.asarray(rgba.convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _read_tiff_rgb(path: Path, notes: list[str]) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        if not tf.pages:
            raise InputError(f"{path}: TIFF without any image")
        page = tf.pages[0]
        ph = getattr(page, "photometric", None)
        photometric = 2 if ph is None else int(ph)
        arr = np.asarray(page.asarray())
    if arr.ndim == 3 and arr.shape[0] in (2, 3, 4) and arr.shape[-1] not in (2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    cmyk = photometric == 5 and arr.ndim == 3 and arr.shape[-1] >= 4  # SEPARATED
    if arr.ndim == 3 and arr.shape[-1] in (2, 4) and not cmyk:
        _alpha_note(arr[..., -1], notes)
    arr = _to_uint8(arr, path, notes)
    if cmyk:
        notes.append("CMYK image converted to RGB")
        cmy, k = arr[..., :3].astype(np.uint16), arr[..., 3:4].astype(np.uint16)
        return ((255 - cmy) * (255 - k) // 255).astype(np.uint8)
    if arr.ndim == 2 and photometric == 0:  # MINISWHITE grey: 0 is white
        return 255 - arr
    if arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha
        return arr[..., 0]
    return arr


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel integer mask (class ids or instance ids) without any conversion.

    Palette PNGs give their indices; RGB masks with equal channels give channel 0.

    Returns:
        (H, W) integer array (uint8, uint16 or int32).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(str(path)))
        else:
            with Image.open(path) as im:
                arr = (
                    np.asarray(im)
                    if im.mode in ("L", "P", "I", "I;16", "1")
                    else np.asarray(im.convert("RGB"))
                )
    except Exception as e:
        raise InputError(f"{path}: cannot read mask ({e})") from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise InputError(f"{path}: RGB mask with different channels; use a colour map to convert it")
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def encode_png(arr: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) / (H, W, 3) or uint16 (H, W) array as PNG bytes."""
    if arr.dtype not in (np.uint8, np.uint16) or (arr.dtype == np.uint16 and arr.ndim != 2):
        raise ValueError(f"expected uint8 (H, W[, 3]) or uint16 (H, W) array, got {arr.dtype} {arr.shape}")
    im = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_png(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    """Write an array as PNG atomically (uint8 RGB/grey, or uint16 grey)."""
    atomic_write_bytes(path, encode_png(arr))


class DatasetWriter:
    """Write samples of a data set into `root` in the standard layout.

    Example:
        >>> w = DatasetWriter(root)                                   # doctest: +SKIP
        >>> w.add("case1", image, label, inst)                        # doctest: +SKIP
        >>> w.finish(info)                                            # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for sub in ("images", "labels"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.ids: list[str] = []

    def add(self, case_id: str, image: np.ndarray, label: np.ndarray,
            instances: np.ndarray | None = None) -> None:
        """Write one sample; checks shapes and dtypes.

        Args:
            case_id: file stem, unique in the data set.
            image: (H, W, 3) uint8.
            label: (H, W) class ids (cast to uint8).
            instances: (H, W) instance ids (cast to uint16) or None.
        """
        check_id(case_id, where=str(self.root))
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{case_id}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if label.shape != image.shape[:2]:
            raise ValueError(f"{case_id}: label shape {label.shape} != image shape {image.shape[:2]}")
        if label.max(initial=0) > 255 or label.min(initial=0) < 0:
            raise ValueError(f"{case_id}: label values must fit uint8")
        write_png(self.root / "images" / f"{case_id}.png", image)
        write_png(self.root / "labels" / f"{case_id}.png", label.astype(np.uint8))
        if instances is not None:
            if instances.shape != image.shape[:2]:
                raise ValueError(f"{case_id}: instance shape {instances.shape} != image {image.shape[:2]}")
            if instances.max(initial=0) > 65535:
                raise ValueError(f"{case_id}: more than 65535 instances")
            (self.root / "instances").mkdir(exist_ok=True)
            write_png(self.root / "instances" / f"{case_id}.png", instances.astype(np.uint16))
        self.ids.append(case_id)

    def finish(self, info: DatasetInfo, manifest: dict[str, Any] | None = None) -> None:
        """Write `dataset.json`, then `manifest.json` last."""
        write_dataset_info(self.root, info)
        man = {"n_images": len(self.ids), **(manifest or {})}
        write_json(self.root / "manifest.json", man)


def find_images(folder: str | os.PathLike[str], suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Return image files in `folder` (sorted by name) whose suffix is in `suffixes`."""
    sfx = {s.lower() for s in suffixes}
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in sfx)
