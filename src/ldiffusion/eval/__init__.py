"""Evaluation: integer label arrays in, metrics out (semantic, instance, gland) plus folder reports."""

from __future__ import annotations

from ldiffusion.eval.glas import GlandAccumulator, object_dice, object_f1, object_hausdorff
from ldiffusion.eval.instance import (
    PQAccumulator,
    aji,
    instance_classes,
    mpq,
    pairwise_iou,
    pq,
    relabel_contiguous,
)
from ldiffusion.eval.postprocess import instances_from_semantic
from ldiffusion.eval.report import evaluate_folder, format_table
from ldiffusion.eval.semantic import ConfusionMatrix, PerImageMean, confusion_matrix, semantic_scores

__all__ = [
    "ConfusionMatrix",
    "GlandAccumulator",
    "PQAccumulator",
    "PerImageMean",
    "aji",
    "confusion_matrix",
    "evaluate_folder",
    "format_table",
    "instance_classes",
    "instances_from_semantic",
    "mpq",
    "object_dice",
    "object_f1",
    "object_hausdorff",
    "pairwise_iou",
    "pq",
    "relabel_contiguous",
    "semantic_scores",
]
