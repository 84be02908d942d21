"""What `ldiffusion view` shows: slide prediction folders and image-folder predictions, found on disk.

A **slide output** is a folder written by `ldiffusion slide predict` (`done.json`, `stats.json`,
`labels.ome.tif`, optionally `uncertainty.ome.tif` and `annotations.geojson`). The slide file is
the one recorded in `done.json` unless `--slide` names another. The class map's placement in the
slide's level-0 frame comes from `done.json` (`params.origin`, `params.scale`).

An **image set** is a folder written by `ldiffusion predict` (`<id>.png` class maps,
`<id>_overlay.png`, optionally `<id>_unc.png`); the input images are found in `images_dir`
(a folder of images, or a prepared data set whose `images/` and `dataset.json` are used).

Class names and colours: `stats.json` (names; colours when it has them), else the object
colours of `annotations.geojson`, else the palette `slide predict` uses by default.

Only files found here at start-up are ever served; request paths never reach the file system.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import IMAGE_SUFFIXES, read_image
from ldiffusion.infer.writers import default_palette
from ldiffusion.view.objects import LazyObjects
from ldiffusion.view.tiles import (
    LabelPyramid,
    TileGrid,
    colour_labels,
    colour_uncertainty,
)

logger = logging.getLogger(__name__)

DONE_NAME = "done.json"
STATS_NAME = "stats.json"
LABELS_NAME = "labels.ome.tif"
UNCERTAINTY_NAME = "uncertainty.ome.tif"
GEOJSON_NAME = "annotations.geojson"
#: object colours are read from the GeoJSON at start-up only when it is smaller than this
GEOJSON_COLOUR_SCAN_BYTES = 20 * 2**20
SLIDE_LAYERS = ("slide", "labels", "uncertainty", "objects")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _palette(names: list[str], given: list[Any] | None, by_name: dict[str, Any] | None) -> np.ndarray:
    pal = default_palette(len(names)).copy()
    for k, name in enumerate(names):
        c = (given[k] if given and k < len(given) else None) or (by_name or {}).get(name)
        if c is not None and len(c) >= 3:
            pal[k] = np.asarray(c[:3], dtype=np.uint8)
    return pal


def _regular_files(folder: Path) -> dict[str, Path]:
    """Name -> path of the regular files directly in `folder` (no links, no subfolders)."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


@dataclass
class SlideOutput:
    """One `slide predict` output folder with its slide, opened lazily.

    Attributes:
        sid: id shown in URLs (the folder name).
        folder: the output folder.
        slide_path: the slide file.
        mpp: microns per level-0 pixel (None when unknown).
    """

    sid: str
    folder: Path
    slide_path: Path
    mpp: float | None
    origin: tuple[float, float]
    scale: float
    coords: str
    stats: dict[str, Any]
    class_names: list[str]
    palette: np.ndarray
    files: dict[str, Path]
    _reader: Any = None
    _labels: LabelPyramid | None = None
    _unc: LabelPyramid | None = None
    _objects: LazyObjects | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _read_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, folder: str | Path, slide: str | Path | None = None) -> SlideOutput:
        """Read a `slide predict` output folder (the slide itself is opened on first use).

        Raises:
            InputError: `done.json` or `labels.ome.tif` missing, or the slide file not found.
        """
        folder = Path(folder).resolve()
        done_path = folder / DONE_NAME
        if not done_path.is_file():
            raise InputError(f"{done_path}: not found; is {folder} a `slide predict` output folder?")
        done = _read_json(done_path)
        if not (folder / LABELS_NAME).is_file():
            raise InputError(
                f"{folder / LABELS_NAME}: not found; run `slide predict` with --formats ome-tiff"
            )
        slide_path = Path(slide) if slide is not None else Path(str(done.get("slide", "")))
        if not slide_path.is_file():
            raise InputError(
                f"{done_path}: slide {str(slide_path)!r} not found; pass --slide PATH to the slide file"
            )
        params = done.get("params") or {}
        stats = _read_json(folder / STATS_NAME) if (folder / STATS_NAME).is_file() else {}
        classes = sorted(stats.get("classes") or [], key=lambda c: int(c.get("id", 0)))
        names = [str(c.get("name", f"class{c.get('id')}")) for c in classes] or ["background", "class1"]
        colours = [c.get("color") for c in classes] if any(c.get("color") for c in classes) else None
        by_name = None
        geo = folder / GEOJSON_NAME
        if colours is None and geo.is_file() and geo.stat().st_size <= GEOJSON_COLOUR_SCAN_BYTES:
            by_name = {}
            for feat in _read_json(geo).get("features") or []:
                klass = (feat.get("properties") or {}).get("classification") or {}
                if "name" in klass and "color" in klass:
                    by_name.setdefault(str(klass["name"]), klass["color"])
        origin = params.get("origin") or [0, 0]
        out = cls(
            sid=folder.name,
            folder=folder,
            slide_path=slide_path.resolve(),
            mpp=float(params["mpp"]) if params.get("mpp") else None,
            origin=(float(origin[0]), float(origin[1])),
            scale=float(params.get("scale") or 1.0),
            coords=str(params.get("coords") or "qupath"),
            stats=stats,
            class_names=names,
            palette=_palette(names, colours, by_name),
            files=_regular_files(folder),
        )
        return out

    # ------------------------------------------------------------------ lazily opened sources
    @property
    def reader(self) -> Any:
        """The slide reader (opened on first use)."""
        with self._lock:
            if self._reader is None:
                from ldiffusion.infer.slide import open_slide

                self._reader = open_slide(self.slide_path, mpp=self.mpp)
            return self._reader

    @property
    def labels(self) -> LabelPyramid:
        """The class map pyramid."""
        with self._lock:
            if self._labels is None:
                self._labels = LabelPyramid(self.folder / LABELS_NAME)
            return self._labels

    @property
    def uncertainty(self) -> LabelPyramid | None:
        """The uncertainty pyramid (None when the folder has none)."""
        if UNCERTAINTY_NAME not in self.files:
            return None
        with self._lock:
            if self._unc is None:
                self._unc = LabelPyramid(self.folder / UNCERTAINTY_NAME)
            return self._unc

    @property
    def objects(self) -> LazyObjects | None:
        """The object index of `annotations.geojson` (built on first use; None when absent)."""
        if GEOJSON_NAME not in self.files:
            return None
        with self._lock:
            if self._objects is None:
                bx, by = self.reader.bounds_offset if self.coords == "qupath" else (0, 0)
                ids = {n: k for k, n in enumerate(self.class_names)}
                self._objects = LazyObjects(self.folder / GEOJSON_NAME, (float(bx), float(by)), ids)
            return self._objects

    @property
    def grid(self) -> TileGrid:
        """The deep-zoom grid of the slide's level 0."""
        w, h = self.reader.dimensions
        return TileGrid(int(w), int(h), 256)

    def close(self) -> None:
        """Release the slide and TIFF handles."""
        for src in (self._reader, self._labels, self._unc):
            if src is not None:
                src.close()

    # ------------------------------------------------------------------ rendering
    def info(self) -> dict[str, Any]:
        """JSON description for the page: size, tile pyramid, mpp, classes (with mm²), layers."""
        g = self.grid
        reader = self.reader
        classes = []
        by_id = {int(c.get("id", -1)): c for c in self.stats.get("classes") or []}
        for k, name in enumerate(self.class_names):
            st = by_id.get(k, {})
            classes.append(
                {
                    "id": k,
                    "name": name,
                    "color": [int(v) for v in self.palette[k]],
                    "area_mm2": st.get("area_mm2"),
                    "pixels": st.get("pixels"),
                    "fraction_of_foreground": st.get("fraction_of_foreground"),
                }
            )
        layers = ["slide", "labels"]
        if UNCERTAINTY_NAME in self.files:
            layers.append("uncertainty")
        if GEOJSON_NAME in self.files:
            layers.append("objects")
        from ldiffusion.view.objects import MAX_OUTLINE_DOWNSAMPLE
        from ldiffusion.view.tiles import UNCERTAINTY_LUT

        return {
            "id": self.sid,
            "slide": self.slide_path.name,
            "width": g.width,
            "height": g.height,
            "tile_px": g.tile_px,
            "max_level": g.max_level,
            "min_level": g.min_level_for(max(reader.level_downsamples)),
            "objects_max_downsample": MAX_OUTLINE_DOWNSAMPLE,
            "mpp": reader.mpp,
            "classes": classes,
            "layers": layers,
            "uncertainty_colormap": [[int(v) for v in UNCERTAINTY_LUT[i]] for i in range(0, 256, 32)]
            + [[int(v) for v in UNCERTAINTY_LUT[255]]],
            "files": sorted(self.files),
        }

    def tile(self, layer: str, level: int, col: int, row: int) -> np.ndarray:
        """Render one tile: (h, w, 3) uint8 for "slide", (h, w, 4) RGBA for the other layers.

        Raises:
            InputError: unknown layer, a layer this output lacks, or an address outside the pyramid.
        """
        x0, y0, w, h, ds = self.grid.tile_region(level, col, row)
        if layer == "slide":
            reader = self.reader
            with self._read_lock:
                return reader.read_scaled(x0, y0, w, h, float(ds))
        if layer == "labels":
            vals, inside = self.labels.sample(x0, y0, w, h, ds, origin=self.origin, scale=self.scale)
            return colour_labels(vals, inside, self.palette)
        if layer == "uncertainty":
            unc = self.uncertainty
            if unc is None:
                raise InputError(f"{self.sid}: no {UNCERTAINTY_NAME} (run `slide predict --uncertainty`)")
            vals, inside = unc.sample(x0, y0, w, h, ds, origin=self.origin, scale=self.scale)
            return colour_uncertainty(vals, inside)
        if layer == "objects":
            objs = self.objects
            if objs is None:
                raise InputError(f"{self.sid}: no {GEOJSON_NAME}")
            return objs.get().outline_tile(x0, y0, w, h, ds)
        raise InputError(f"layer {layer!r} is unknown; expected one of {list(SLIDE_LAYERS)}")

    def object_at(self, x: float, y: float) -> dict[str, Any]:
        """What lies at level-0 `(x, y)`: class-map class, uncertainty, object and its measures."""
        out: dict[str, Any] = {"x": x, "y": y}
        vals, inside = self.labels.sample(x - 0.5, y - 0.5, 1, 1, 1.0, origin=self.origin, scale=self.scale)
        out["class_id"] = int(vals[0, 0]) if inside[0, 0] else None
        out["class"] = (
            self.class_names[out["class_id"]]
            if out["class_id"] is not None and out["class_id"] < len(self.class_names)
            else None
        )
        unc = self.uncertainty
        if unc is not None:
            u, uin = unc.sample(x - 0.5, y - 0.5, 1, 1, 1.0, origin=self.origin, scale=self.scale)
            out["uncertainty"] = float(u[0, 0]) / 255.0 if uin[0, 0] else None
        objs = self.objects
        if objs is not None:
            index = objs.get()
            i = index.at(x, y)
            if i is not None:
                obj = index.describe(i, self.reader.mpp)
                if unc is not None:
                    obj["mean_uncertainty"] = index.mean_over(i, unc, self.origin, self.scale)
                out["object"] = obj
        return out


@dataclass
class ImageSet:
    """An `ldiffusion predict` output folder (class maps per image id) with its input images."""

    sid: str
    folder: Path
    ids: list[str]
    images: dict[str, Path]
    class_names: list[str]
    palette: np.ndarray

    @classmethod
    def open(cls, folder: str | Path, images_dir: str | Path | None = None) -> ImageSet:
        """Find the predicted ids of `folder` and their input images in `images_dir` (optional)."""
        folder = Path(folder).resolve()
        files = _regular_files(folder)
        ids = sorted(
            n[: -len("_overlay.png")]
            for n in files
            if n.endswith("_overlay.png") and n[: -len("_overlay.png")] + ".png" in files
        )
        if not ids:
            raise InputError(f"{folder}: no `predict` outputs (<id>.png with <id>_overlay.png) found")
        names: list[str] | None = None
        pal = None
        images: dict[str, Path] = {}
        if images_dir is not None:
            root = Path(images_dir).resolve()
            if not root.is_dir():
                raise InputError(f"{images_dir}: --images folder not found")
            src = root
            if (root / "dataset.json").is_file():
                from ldiffusion.data.format import read_dataset_info

                info = read_dataset_info(root)
                names, pal = info.class_names, info.palette
                src = root / "images"
            by_stem = {}
            for p in sorted(src.iterdir()) if src.is_dir() else []:
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                    by_stem.setdefault(p.stem, p)
            images = {i: by_stem[i] for i in ids if i in by_stem}
        if names is None:
            k = 2
            for i in ids[:50]:  # the class count: the largest id seen (cheap: first 50 maps)
                k = max(k, int(read_label(files[f"{i}.png"]).max()) + 1)
            names = ["background"] + [f"class{j}" for j in range(1, k)]
        palette = pal if pal is not None and len(pal) >= len(names) else default_palette(len(names))
        return cls(folder.name, folder, ids, images, list(names), np.asarray(palette, np.uint8))

    def file(self, case_id: str, suffix: str) -> Path | None:
        """`<id><suffix>` of this folder when it exists (the id must be one of `ids`)."""
        p = self.folder / f"{case_id}{suffix}"
        return p if case_id in self.ids and p.is_file() else None

    def info(self) -> dict[str, Any]:
        """JSON description for the page."""
        return {
            "id": self.sid,
            "ids": self.ids,
            "with_images": sorted(self.images),
            "with_uncertainty": [i for i in self.ids if self.file(i, "_unc.png") is not None],
            "classes": [
                {"id": k, "name": n, "color": [int(v) for v in self.palette[k]]}
                for k, n in enumerate(self.class_names)
            ],
        }

    def render(self, case_id: str, kind: str) -> np.ndarray:
        """One picture of an image id: "image", "labels" (class colours), "uncertainty", "overlay".

        Raises:
            InputError: unknown kind, or the file is missing.
        """
        if case_id not in self.ids:
            raise InputError(f"image id {case_id!r} is not in {self.sid}")
        if kind == "image":
            if case_id not in self.images:
                raise InputError(f"{case_id}: input image not found (pass --images DIR)")
            return read_image(self.images[case_id])
        if kind == "labels":
            lab = read_label(self.folder / f"{case_id}.png")
            return np.asarray(self.palette)[np.clip(lab, 0, len(self.palette) - 1)]
        if kind == "uncertainty":
            p = self.file(case_id, "_unc.png")
            if p is None:
                raise InputError(f"{case_id}: no uncertainty map (run `predict --uncertainty`)")
            u = read_label(p)
            return colour_uncertainty(u, np.ones(u.shape, bool))[..., :3]
        if kind == "overlay":
            return read_image(self.folder / f"{case_id}_overlay.png")
        raise InputError(f"picture {kind!r} is unknown; expected image, labels, uncertainty or overlay")

    def class_shares(self, case_id: str) -> list[float]:
        """Fraction of the image's pixels of each class."""
        lab = read_label(self.folder / f"{case_id}.png")
        counts = np.bincount(lab.ravel(), minlength=len(self.class_names))[: len(self.class_names)]
        return (counts / max(1, lab.size)).tolist()


def read_label(path: Path) -> np.ndarray:
    """Read a single-channel uint8 PNG (class map or uncertainty)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr.astype(np.uint8)


@dataclass
class Catalog:
    """Everything one `ldiffusion view` serves: slide outputs and image sets, by id."""

    slides: dict[str, SlideOutput]
    image_sets: dict[str, ImageSet]

    @classmethod
    def discover(
        cls, root: str | Path, *, slide: str | Path | None = None, images_dir: str | Path | None = None
    ) -> Catalog:
        """Find what `root` holds: one output folder, or a parent of several (one level down).

        Raises:
            InputError: `root` missing, holds nothing viewable, or `--slide` used with many slides.
        """
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: output folder not found")
        slides: dict[str, SlideOutput] = {}
        sets: dict[str, ImageSet] = {}

        def visit(folder: Path) -> None:
            if (folder / DONE_NAME).is_file():
                s = SlideOutput.open(folder, slide)
                slides[s.sid] = s
            elif any(folder.glob("*_overlay.png")):
                im = ImageSet.open(folder, images_dir)
                sets[im.sid] = im

        visit(root)
        if not slides and not sets:
            for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(sub)
        if not slides and not sets:
            raise InputError(
                f"{root}: no `slide predict` output (done.json) or `predict` output (<id>_overlay.png) "
                "in it or in its subfolders"
            )
        if slide is not None and len(slides) > 1:
            raise InputError(f"--slide {slide} given but {root} holds {len(slides)} slide outputs; give one")
        return cls(slides, sets)

    def close(self) -> None:
        """Release every open file."""
        for s in self.slides.values():
            s.close()


__all__ = ["SLIDE_LAYERS", "Catalog", "ImageSet", "SlideOutput", "read_label"]
