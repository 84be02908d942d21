"""MoNuSeg 2018 (Multi-Organ Nucleus Segmentation) -> ldiffusion format ("monuseg").

Source layout (the official release, test images and XML split into two folders)::

    train/Tissue Images/<TCGA-id>.{tif,webp,png}    30 images, 1000x1000, 40x
    train/Annotations/<TCGA-id>.{xml,xml.gz}        Aperio ImageScope XML (may be missing)
    train/Binary_masks/<TCGA-id>.png                binary nucleus mask, values {0, 1} (optional)
    test/Tissue Images/ ...                         14 images
    test/Annotations/ ...

Labels: 0 background, 1 nucleus. Where an XML file exists, nuclei are rasterised from it:
instance id k is the k-th `Region` in document order (1-based), each polygon filled with
`skimage.draw.polygon` (pixel centres inside the polygon); **a later region overwrites an earlier
one where they overlap**, so an id may cover fewer pixels than its polygon, or none. Where there
is no XML, the label is taken from the binary mask and no instance map is written (touching
nuclei merge there, so instance metrics cannot be computed on those images).

Splits: the official 30 train / 14 test split is kept; a seeded validation split of 6 train
images is drawn (24 / 6 / 14). Every image comes from a different TCGA patient.
Scale: 40x, mpp 0.25 (the XML headers state MicronsPerPixel 0.2527).
"""

from __future__ import annotations

import gzip
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

from ldiffusion.core.errors import DatasetFormatError
from ldiffusion.data.converters._common import (
    check_shape,
    check_src,
    collect_options,
    find_file,
    finish,
    prepare_out,
    progress_bar,
    register,
)
from ldiffusion.data.format import (
    ClassInfo,
    DatasetInfo,
    DatasetWriter,
    find_images,
    read_image,
    read_mask,
)
from ldiffusion.data.splits import make_splits, split_groups

logger = logging.getLogger(__name__)

NAME = "monuseg"
VERSION = 1
MPP = 0.25
CLASSES = (ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "nucleus", (255, 0, 0)))


def parse_aperio_xml(path: str | Path) -> list[np.ndarray]:
    """Read the region polygons of an Aperio ImageScope XML file (plain or `.xml.gz`).

    Args:
        path: `.xml` or `.xml.gz` file with `Annotations/Annotation/Regions/Region/Vertices/Vertex`.

    Returns:
        One (N, 2) float64 array of (x, y) vertex coordinates (level-0 pixels) per `Region`, in
        document order over all `Annotation` elements. Regions without vertices give (0, 2) arrays.

    Raises:
        DatasetFormatError: the file cannot be parsed or a vertex lacks a numeric X or Y.
    """
    path = Path(path)
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                root = ET.parse(f).getroot()
        else:
            root = ET.parse(path).getroot()
    except (OSError, ET.ParseError, EOFError) as e:
        raise DatasetFormatError(f"{path}: cannot parse Aperio XML ({e})") from e
    polygons: list[np.ndarray] = []
    for region in root.iter("Region"):
        pts = []
        for v in region.iter("Vertex"):
            try:
                pts.append((float(v.attrib["X"]), float(v.attrib["Y"])))
            except (KeyError, ValueError) as e:
                raise DatasetFormatError(f"{path}: Region Id={region.get('Id')!r} has a Vertex without "
                                         f"numeric X/Y attributes ({v.attrib})") from e
        polygons.append(np.asarray(pts, dtype=np.float64).reshape(-1, 2))
    return polygons


def rasterise_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill (x, y) polygons into an instance map; polygon k gets id k + 1, later ones overwrite.

    Args:
        polygons: (N, 2) arrays of x, y vertices.
        shape: (H, W) of the map.

    Returns:
        (H, W) int32 instance map, 0 = no nucleus.
    """
    inst = np.zeros(shape, dtype=np.int32)
    for k, poly in enumerate(polygons):
        if len(poly) < 3:
            continue
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=shape)
        inst[rr, cc] = k + 1
    return inst


def _convert_split(folder: Path, split: str, writer: DatasetWriter,
                   progress: bool) -> tuple[list[str], list[str]]:
    """Write every image of `folder`; return (ids, ids with an instance map)."""
    img_dir = folder / "Tissue Images"
    if not img_dir.is_dir():
        raise DatasetFormatError(f"{img_dir}: folder not found; expected MoNuSeg layout "
                                 f"'{split}/Tissue Images/*.tif' (see the module docstring)")
    images = find_images(img_dir)
    if not images:
        raise DatasetFormatError(f"{img_dir}: no images found (.tif, .webp, .png, ...)")
    ids, with_inst = [], []
    with progress_bar(images, desc=f"monuseg {split}", progress=progress) as bar:
        for p in bar:
            stem = p.stem
            image = read_image(p)
            xml = find_file(folder / "Annotations", stem, (".xml", ".xml.gz"))
            inst = None
            if xml is not None:
                polys = parse_aperio_xml(xml)
                inst = rasterise_polygons(polys, image.shape[:2])
                label = (inst > 0).astype(np.uint8)
                with_inst.append(stem)
            else:
                mpath = find_file(folder / "Binary_masks", stem)
                if mpath is None:
                    raise DatasetFormatError(f"{p}: no annotation found; expected {folder}/Annotations/"
                                             f"{stem}.xml[.gz] or {folder}/Binary_masks/{stem}.png")
                label = read_mask(mpath)
                check_shape(label, mpath, image, p)
                vals = set(np.unique(label).tolist())
                if not (vals <= {0, 1} or vals <= {0, 255}):
                    raise DatasetFormatError(f"{mpath}: mask values {sorted(vals - {0, 1})[:5]} are not "
                                             "valid; expected a binary mask {0, 1} (or {0, 255})")
                label = (label > 0).astype(np.uint8)
            writer.add(stem, image, label, inst)
            ids.append(stem)
    return ids, with_inst


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True,
            val_images: int = 6) -> DatasetInfo:
    """Convert a MoNuSeg 2018 release folder.

    Args:
        src: folder holding `train/` and `test/` (see the module docstring).
        out: output folder (empty, new, or a previous conversion to replace).
        seed: seed of the validation split.
        progress: show a progress bar on stderr.
        val_images: number of official training images moved to validation.

    Returns:
        The written `DatasetInfo` (task "instance", classes background/nucleus, mpp 0.25).
    """
    options = collect_options(locals())
    src = check_src(src, "MoNuSeg")
    writer = prepare_out(out)
    train_all, inst_train = _convert_split(src / "train", "train", writer, progress)
    test, inst_test = _convert_split(src / "test", "test", writer, progress)
    train, val = split_groups(train_all, n_val_groups=int(val_images), seed=seed)
    info = DatasetInfo(
        name="monuseg", task="instance", classes=CLASSES, mpp=MPP,
        splits=make_splits(train, val, test),
        source="MoNuSeg 2018 (Kumar et al., IEEE TMI 2017 / MICCAI 2018 challenge); instances from "
               "Aperio XML, label-only (no instance map) from Binary_masks where the XML is missing",
        license="CC BY-NC-SA 4.0",
    )
    n_inst = len(inst_train) + len(inst_test)
    logger.info("monuseg: %d of %d images have XML instance maps", n_inst, len(train_all) + len(test))
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options,
                  extra={"with_instances": sorted(inst_train + inst_test)})
