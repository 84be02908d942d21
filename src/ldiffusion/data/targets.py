"""Instance-aware training targets: the 'contour' target and its inverse (instances from a class map).

`contour_target` turns a class map plus an instance map into K + 1 classes: the data set's classes
for object interiors and one extra class, "boundary", for the outer `boundary_px` pixels of every
object (also where two objects touch). Any semantic segmenter trained on it learns to draw a line
between touching nuclei or glands with no change to its network (as in the three-class targets of
DCAN / HoVer-Net-style pipelines). `instances_from_contour` inverts it at prediction time: each
connected interior region is a marker, and a watershed over the distance to the markers gives every
boundary pixel back to the nearest object, so touching objects come out as separate instances.
`redraw_markers` re-draws the interior of a predicted contour map from its probabilities before that
step (a stricter interior threshold and / or eroded markers), to cut thin interior bridges that would
merge two objects; both settings are inference-time keys chosen on validation.
`separation_weights` is the training-side counterpart: the per-pixel loss weight of the U-Net paper
(Ronneberger et al. 2015, eq. 2), large in the narrow gaps between neighbouring objects, where a
merge is decided.

Arrays: class maps (H, W) integer, instance maps (H, W) integer (0 = no object).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ldiffusion.core.errors import InputError

__all__ = ["components_per_class", "contour_target", "instances_from_contour", "redraw_markers",
           "separation_weights"]


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def components_per_class(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Return (H, W) int32 instance ids: the 4-connected components of each foreground class."""
    inst = np.zeros(label.shape, dtype=np.int32)
    for c in np.unique(label):
        if c == 0 or c == ignore_index:
            continue
        comp, _ = ndi.label(label == c)
        inst = np.where(comp > 0, comp + inst.max(), inst)
    return inst


def contour_target(label: np.ndarray, inst: np.ndarray, boundary_px: int, boundary_class: int,
                   ignore_index: int = 255) -> np.ndarray:
    """Mark the outer `boundary_px` pixels of every object with `boundary_class`.

    A pixel of object i is interior when every pixel within `boundary_px` (Euclidean) belongs to
    object i too; the image border does not count as an edge. Pixels labelled `ignore_index` stay so.

    Args:
        label: (H, W) class ids (0 = background).
        inst: (H, W) instance ids (0 = no object), same size.
        boundary_px: band width in pixels (>= 1).
        boundary_class: class id given to the band (the data set's class count K).
        ignore_index: label value left untouched.

    Returns:
        (H, W) array of `label`'s dtype (widened to hold `boundary_class`).

    Example:
        >>> inst = np.zeros((7, 7), int); inst[1:6, 1:6] = 1
        >>> contour_target((inst > 0).astype(np.uint8), inst, 1, 2)[1:6, 3].tolist()
        [2, 1, 1, 1, 2]
    """
    if label.shape != inst.shape:
        raise InputError(f"contour target: label {label.shape} and instance map {inst.shape} differ in size")
    if boundary_px < 1:
        raise InputError(f"boundary_px={boundary_px} should be >= 1")
    inst = inst.astype(np.int64, copy=False)
    foot = _disk(int(boundary_px))
    lo = ndi.minimum_filter(inst, footprint=foot, mode="nearest")
    hi = ndi.maximum_filter(inst, footprint=foot, mode="nearest")
    band = (inst > 0) & ((lo != inst) | (hi != inst)) & (label != ignore_index)
    out = label.astype(np.promote_types(label.dtype, np.min_scalar_type(boundary_class)), copy=True)
    out[band] = boundary_class
    return out


def separation_weights(inst: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """Return the (H, W) float32 loss weight 1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    d1 and d2 are the Euclidean distances (px) of a pixel to the nearest and the second-nearest
    object of `inst` (0 inside an object for its own). The weight is high in thin gaps between two
    objects and on their touching borders, and 1 (to within exp(-4.5) w0) farther than 3 sigma from
    any pair: the weight map of the U-Net paper (Ronneberger et al. 2015, eq. 2, without its class
    balancing term). Each object's distances are computed in its bounding box grown by 3 sigma, so
    the cost grows with the number of objects, not with their product with the image size.

    Args:
        inst: (H, W) instance ids (0 = no object).
        w0: peak extra weight (>= 0; 0 gives all ones).
        sigma: width of the decay in pixels (> 0).

    Example:
        >>> inst = np.zeros((1, 9), int); inst[0, :3] = 1; inst[0, 6:] = 2
        >>> separation_weights(inst, 10.0, 2.0)[0].round(2).tolist()  # d1 + d2 = 4 from x = 2 to 6
        [1.11, 1.44, 2.35, 2.35, 2.35, 2.35, 2.35, 1.44, 1.11]
    """
    if w0 < 0 or sigma <= 0:
        raise InputError(f"separation weights: w0={w0} should be >= 0 and sigma={sigma} > 0")
    inst = np.asarray(inst)
    out = np.ones(inst.shape, dtype=np.float32)
    if w0 == 0 or inst.max() <= 0:
        return out
    reach = int(np.ceil(3 * sigma))
    d1 = np.full(inst.shape, np.inf, dtype=np.float32)
    d2 = np.full(inst.shape, np.inf, dtype=np.float32)
    for i, box in enumerate(ndi.find_objects(inst), start=1):
        if box is None:
            continue
        win = tuple(slice(max(0, b.start - reach), min(n, b.stop + reach))
                    for b, n in zip(box, inst.shape, strict=True))
        d = ndi.distance_transform_edt(inst[win] != i).astype(np.float32)
        d[d > reach] = np.inf
        a, b = d1[win], d2[win]
        d2[win] = np.minimum(b, np.maximum(a, d))
        d1[win] = np.minimum(a, d)
    near = np.isfinite(d2)
    out[near] += np.float32(w0) * np.exp(-((d1[near] + d2[near]) ** 2) / np.float32(2 * sigma * sigma))
    return out


def instances_from_contour(class_map: np.ndarray, boundary_class: int, *, min_size: int = 10,
                           ignore_index: int | None = 255) -> tuple[np.ndarray, np.ndarray]:
    """Build instances from a predicted contour class map (marker-controlled watershed).

    Markers are the 4-connected regions of interior classes (not 0, not `boundary_class`); the
    object mask is interior + boundary; a watershed on the distance to the markers assigns each
    boundary pixel to the nearest marker inside its connected object. Boundary regions that no
    marker reaches become objects of their own. Each instance's class is the majority interior class
    under it (the most frequent interior class of the image for marker-less ones), so multi-class
    sets keep their nucleus types.

    Args:
        class_map: (H, W) integer classes 0..K, K = `boundary_class`.
        boundary_class: the class id of the boundary band.
        min_size: objects with fewer pixels are dropped (0 keeps all).
        ignore_index: never an object class.

    Returns:
        (instances (H, W) int32 with ids 1..n, semantic (H, W) uint8 class map over the data set's
        classes 0..K-1: each instance painted with its class, background elsewhere).
    """
    from skimage.segmentation import watershed

    class_map = np.asarray(class_map)
    if class_map.ndim != 2 or not np.issubdtype(class_map.dtype, np.integer):
        raise InputError(
            f"class_map must be an (H, W) integer array, got {class_map.dtype} {class_map.shape}"
        )
    interior = (class_map != 0) & (class_map != boundary_class)
    if ignore_index is not None:
        interior &= class_map != ignore_index
    objects = interior | (class_map == boundary_class)
    markers, n = ndi.label(interior)
    if n:
        dist = ndi.distance_transform_edt(markers == 0)
        inst = watershed(dist, markers, mask=objects)
    else:
        inst = np.zeros(class_map.shape, dtype=np.int32)
    left = objects & (inst == 0)
    if left.any():
        extra, m = ndi.label(left)
        inst = np.where(left, extra + n, inst)
        n += m
    inst = inst.astype(np.int32)
    if n == 0:
        return inst, np.zeros(class_map.shape, dtype=np.uint8)
    sizes = np.bincount(inst.ravel(), minlength=n + 1)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    # majority interior class per instance
    votes = np.zeros((n + 1, int(boundary_class)), dtype=np.int64)
    sel = interior & (inst > 0)
    np.add.at(votes, (inst[sel], class_map[sel].astype(np.int64)), 1)
    cls = votes.argmax(1)
    fallback = int(votes.sum(0)[1:].argmax()) + 1 if boundary_class > 1 else 1
    cls[votes.sum(1) == 0] = fallback
    cls[~keep] = 0
    lut = np.zeros(n + 1, dtype=np.int32)
    ids = np.flatnonzero(keep)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[inst], cls[inst].astype(np.uint8)


def redraw_markers(probs: np.ndarray, *, marker_threshold: float | None = None,
                   marker_erosion_px: int = 0) -> np.ndarray:
    """Class map of a contour prediction whose interior (the watershed markers) is re-drawn.

    The objects stay those of the arg-max (every pixel whose arg-max is not background); only the
    split between interior and boundary changes. With `marker_threshold` a pixel is interior where the
    summed probability of the interior classes exceeds it (instead of where an interior class wins the
    arg-max); with `marker_erosion_px` the interior is then eroded by a disc of that radius. Pixels
    that leave the interior become boundary, so they stay in their object and `instances_from_contour`
    hands them to the nearest marker. A bridge of interior pixels that is thinner than the erosion
    diameter or less sure than the threshold no longer joins two markers. With neither setting the
    result is the arg-max.

    Args:
        probs: (K + 1, H, W) class probabilities; channel 0 background, 1..K-1 the interior classes,
            K the boundary.
        marker_threshold: interior where p(interior classes) > this (0 < t <= 1); None: the arg-max.
        marker_erosion_px: erosion radius in pixels of `probs` (0: none).

    Returns:
        (H, W) int64 class map 0..K; an interior pixel keeps its most probable interior class.

    Example:
        >>> p = np.zeros((3, 1, 5)); p[1] = [[0.0, 0.9, 0.6, 0.9, 0.0]]; p[2] = 1 - p[1]
        >>> redraw_markers(p, marker_threshold=0.7).tolist()  # the unsure middle becomes boundary
        [[2, 1, 2, 1, 2]]
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] < 3:
        raise InputError(f"contour probabilities must be (K + 1 >= 3, H, W), got shape {probs.shape}")
    if marker_threshold is not None and not 0.0 < marker_threshold <= 1.0:
        raise InputError(f"marker_threshold={marker_threshold} should be in (0, 1]")
    if marker_erosion_px < 0:
        raise InputError(f"marker_erosion_px={marker_erosion_px} should be >= 0")
    boundary = probs.shape[0] - 1
    class_map = probs.argmax(0).astype(np.int64)
    objects = class_map != 0
    if marker_threshold is None:
        interior = objects & (class_map != boundary)
    else:
        interior = objects & (probs[1:boundary].sum(0) > marker_threshold)
    if marker_erosion_px:
        interior = ndi.binary_erosion(interior, structure=_disk(int(marker_erosion_px)))
    interior_class = probs[1:boundary].argmax(0).astype(np.int64) + 1
    return np.where(interior, interior_class, np.where(objects, boundary, 0))
