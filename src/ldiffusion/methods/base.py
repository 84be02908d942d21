"""Method base classes: `MethodConfig`, `Stage`, `Trainable` and the `Segmenter` interface.

A method decides *what a step computes* (`training_step`) and how it predicts; the one loop in
`ldiffusion.train.loop.fit` decides iteration, precision, checkpoints, validation and logging.
Multi-stage methods (L-Diffusion: autoencoder -> diffusion -> segmenter) describe their stages with
`stages()` and run through the same loop.

Run folder written by `save(dir)`: `config.json` (method name, config, num_classes, class names,
in_channels, package version) + `model.safetensors` (inference weights only, see
`inference_state_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

import ldiffusion
from ldiffusion.core.config import Config, check_range
from ldiffusion.core.device import autocast
from ldiffusion.core.errors import ConfigError
from ldiffusion.core.io import save_weights, write_json
from ldiffusion.losses.class_balance import class_pixel_counts, inverse_frequency_weights
from ldiffusion.train.schedule import LRSchedule

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
Target = Literal["semantic", "contour"]
ContourFallback = Literal["components", "watershed"]

#: Stain and colour augmentation of the `small` and `paper` presets of every method (off in `tiny`):
#: H&E density scale 1 +- 0.3 and shift +- 0.03 (about the mean haematoxylin density of MoNuSeg
#: training tiles), then brightness/contrast/saturation/hue jitter 0.2. Chosen to cover the stain
#: spread between labs, not tuned on any test set (docs/methods.md).
STAIN_AUGMENTATION: dict[str, float] = {"stain_jitter": 0.3, "stain_bias": 0.03, "color_jitter": 0.2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig(Config):
    """Fields shared by every method.

    Attributes:
        preset: name of the preset the config was built from (informational).
        crop_px: training crop size in pixels.
        batch_size: training batch size.
        lr: learning rate of the main optimiser.
        steps: optimiser steps per stage (ignored when `epochs` is set).
        epochs: when set, a stage runs `epochs` passes over its training samples instead.
        val_every: validate every this many steps (and at the end of each stage); 0 = only at the end.
        ckpt_every: write `train_state.pt` every this many steps (and at the end).
        n_samples: stochastic methods average this many draws in `predict_proba`.
        seed: seed of the run (initialisation, data order, noise).
        precision: autocast of the networks in training steps and in `predict_proba` / `predict` /
            `predict_with_uncertainty`: "fp32", "bf16", or "auto" = bf16 where the device has native
            bf16 arithmetic (`core.device.has_native_bf16`), else fp32. Schedules, samplers' updates
            and losses stay float32. The tiny preset uses fp32, small and paper "auto". Measured:
            bf16 2.3x faster than fp32 for a U-Net `small` step on an AMD EPYC with avx512_bf16; an
            earlier Intel Xeon (AMX) measurement under heavy load found it slower (14.6 vs 6.7 s).
        channels_last: keep 4-D weights in channels-last memory order for training and inference
            (oneDNN's fast convolution layout on CPU: 1.3-1.4x faster there; same results up to float
            rounding).
        max_minutes: wall-clock budget per stage; the stage stops cleanly (checkpointed) when spent.
        lr_schedule: "constant" keeps every optimiser at its rate; "cosine" anneals it to 0 along
            half a cosine over the stage's budget, steps or `max_minutes`, whichever is spent first
            (`train.schedule`). Multiplies a method's own decay (LDSeg's `lr_decay`).
        grad_clip: clip the gradient norm of each optimiser's parameters (None = off).
        flips, rot90, color_jitter: training augmentation.
        scale_jitter: magnification augmentation j (`data.transforms.TrainTransform`): each crop is
            resized by a log-uniform factor in [1 / (1 + j), 1 + j], for slides scanned at another
            resolution; 0 = off.
        stain_jitter, stain_bias: H&E stain augmentation (`data.transforms.stain_jitter`): density
            scale range and shift range; 0 = off.
        target: "semantic" learns the data set's class map; "contour" (instance data sets) adds a
            class "boundary" for the outer `boundary_px` pixels of every object, so touching objects
            are separated by a predicted boundary (`data.targets`); predictions then carry instance
            maps built by marker-controlled watershed from the object interiors.
        boundary_px: width of the boundary band of `target="contour"`, in pixels.
        min_object_px: instances of a contour prediction smaller than this many pixels are dropped
            (`data.targets.instances_from_contour`); an inference-time key (`predict --set`), best chosen
            on validation predictions (`benchmarks/choose_min_object.py`). In the prediction's pixels
            (the files' resolution, whatever `input_scale`).
        class_bias: per-class offsets b (K values, background first) added to the log-probabilities
            before every class decision (`methods.sliding.apply_class_bias`: p_c ∝ p_c · exp(b_c));
            None = off. An inference-time key (`predict --set`), chosen on validation predictions
            (`benchmarks/choose_class_bias.py`), e.g. to undo the over-prediction of rare classes
            that class-weighted training leaves.
        marker_threshold, marker_erosion_px: re-draw the markers of a contour prediction before its
            watershed (`data.targets.redraw_markers`): interior where the interior probability
            exceeds the threshold (None: the arg-max), then eroded by a disc of this radius in the
            prediction's pixels (0: none); cuts thin or unsure interior bridges that merge objects.
            Inference-time keys, chosen on validation with `min_object_px`.
        contour_fallback: where a training image has no instance map (MoNuSeg: 17 of 30 in the public
            copy), the objects of its contour target are the "components" of each class (touching
            objects merge: no boundary between them is taught) or a "watershed" split of them (the
            distance-transform watershed of `evaluate --watershed`, markers at least
            `contour_fallback_distance` px apart): an estimate of the boundaries the outlines would give.
        separation_weight, separation_sigma_px: per-pixel weight of the cross-entropy,
            1 + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) with w0 = `separation_weight` and d1, d2 the
            distances to the nearest and second-nearest object (`data.targets.separation_weights`,
            the U-Net paper's map): the gaps between neighbouring objects, where a merge is decided,
            weigh up to 1 + w0. 0 = off. Training only; sigma in working pixels. Only methods with
            `supports_pixel_weights` (the U-Net) use it; others refuse a non-zero weight.
        input_scale: working resolution as a fraction of the data's (0 < s <= 1): training images,
            labels and instance maps are resized by s when loaded (`data.resample`), and prediction
            resizes each image by s, predicts, and resizes the probabilities back, so outputs keep the
            input's size. crop_px, boundary_px, contour_fallback_distance and the inference tile are
            in working pixels. 1 = off.
        num_workers: DataLoader workers (0 = in-process).
    """

    preset: str = "tiny"
    crop_px: int = 64
    batch_size: int = 4
    lr: float = 1e-3
    steps: int = 60
    epochs: int | None = None
    val_every: int = 20
    ckpt_every: int = 50
    n_samples: int = 1
    seed: int = 0
    precision: Precision = "fp32"
    channels_last: bool = True
    max_minutes: float | None = None
    lr_schedule: LRSchedule = "constant"
    grad_clip: float | None = 1.0
    flips: bool = True
    rot90: bool = True
    color_jitter: float = 0.0
    scale_jitter: float = 0.0
    stain_jitter: float = 0.0
    stain_bias: float = 0.0
    target: Target = "semantic"
    boundary_px: int = 2
    min_object_px: int = 10
    class_bias: tuple[float, ...] | None = None
    marker_threshold: float | None = None
    marker_erosion_px: int = 0
    contour_fallback: ContourFallback = "components"
    contour_fallback_distance: int = 9
    separation_weight: float = 0.0
    separation_sigma_px: float = 5.0
    input_scale: float = 1.0
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_range("crop_px", self.crop_px, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0.0, lo_open=True)
        check_range("steps", self.steps, 1)
        if self.epochs is not None:
            check_range("epochs", self.epochs, 1)
        check_range("val_every", self.val_every, 0)
        check_range("ckpt_every", self.ckpt_every, 1)
        check_range("n_samples", self.n_samples, 1)
        check_range("seed", self.seed, -(2**63), 2**63 - 1)  # torch/NumPy seeds are 64-bit
        check_range("num_workers", self.num_workers, 0)
        check_range("input_scale", self.input_scale, 0.0, 1.0, lo_open=True)
        check_range("color_jitter", self.color_jitter, 0.0, 1.0)
        check_range("scale_jitter", self.scale_jitter, 0.0, 1.0)
        check_range("stain_jitter", self.stain_jitter, 0.0, 0.99)
        check_range("stain_bias", self.stain_bias, 0.0, 1.0)
        check_range("boundary_px", self.boundary_px, 1, 64)
        check_range("min_object_px", self.min_object_px, 0)
        if self.class_bias is not None:
            for i, b in enumerate(self.class_bias):
                check_range(f"class_bias[{i}]", b, -50.0, 50.0)
        if self.marker_threshold is not None:
            check_range("marker_threshold", self.marker_threshold, 0.0, 1.0, lo_open=True)
        check_range("marker_erosion_px", self.marker_erosion_px, 0, 256)
        check_range("contour_fallback_distance", self.contour_fallback_distance, 1, 256)
        check_range("separation_weight", self.separation_weight, 0.0, 1000.0)
        check_range("separation_sigma_px", self.separation_sigma_px, 0.0, 256.0, lo_open=True)
        if self.max_minutes is not None:
            check_range("max_minutes", self.max_minutes, 0.0, lo_open=True)
        if self.grad_clip is not None:
            check_range("grad_clip", self.grad_clip, 0.0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One Adam optimiser of a stage: its parameters, learning rate, betas and weight decay."""

    params: Sequence[nn.Parameter]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage run by `fit`.

    Attributes:
        name: stage name, passed to `training_step(..., stage=name)` and logged.
        optimizers: optimiser name -> spec; `training_step` returns one loss per name.
        steps: optimiser steps (used when `epochs` is None).
        batch_size: batch size.
        epochs: when set, the stage runs this many passes over its samples.
        selects_on_val: keep the best-on-validation weights of this stage (else the last ones).
        uses_unannotated: also train on images whose labels are withheld (`annotated=False`).
        val_every: validation period in steps (0 = only at the end of the stage).
        max_minutes: wall-clock budget of this stage; None = the run's per-stage budget
            (`fit(max_minutes=...)`, else ``cfg.max_minutes``). Set, it replaces that budget for this stage.
    """

    name: str
    optimizers: dict[str, OptimizerSpec]
    steps: int
    batch_size: int
    epochs: int | None = None
    selects_on_val: bool = True
    uses_unannotated: bool = False
    val_every: int = 0
    max_minutes: float | None = None


class Trainable(nn.Module, ABC):
    """Anything `fit` can train: a network plus its losses, stages and run-folder format.

    Subclasses set the class attributes `name` (registry key), `config_cls` and `presets`
    (preset name -> dict of config overrides), and implement `training_step`.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: validation score name, written to metrics.jsonl ("higher is better").
    score_name: ClassVar[str] = "score"
    #: config keys that set the optimiser-step count of each stage (a method whose `steps` means
    #: something else, such as L-Diffusion's T, lists its per-stage keys here).
    stage_step_keys: ClassVar[tuple[str, ...]] = ("steps",)
    #: whether `training_step` weighs its loss by the batch's per-pixel "weight" (`separation_weight`).
    supports_pixel_weights: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, num_classes: int, in_channels: int = 3,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_cls):
            raise ConfigError(f"method {self.name!r} needs a {self.config_cls.__name__}, "
                              f"got {type(cfg).__name__}")
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes} should be >= 1")
        if cfg.separation_weight > 0 and not self.supports_pixel_weights:
            raise ConfigError(f"separation_weight={cfg.separation_weight}: method {self.name!r} does not use "
                              "per-pixel loss weights (only 'unet' does); leave it at 0")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.class_names = list(class_names) if class_names is not None else \
            [f"class{i}" for i in range(num_classes)]
        self.extra_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ training
    @property
    def step_period(self) -> int:
        """Number of training steps after which the work of a step repeats (1: every step alike).

        A method that runs part of its update on every n-th step only (cDAL's ``d_every``) returns n,
        so that a timing of whole periods gives the mean step (`benchmarks/speed.py`).
        """
        return 1

    @abstractmethod
    def training_step(self, batch: dict[str, Any], generator: torch.Generator,
                      stage: str) -> dict[str, torch.Tensor]:
        """Compute the losses of one step.

        Args:
            batch: collated batch (`image` (B, 3, H, W) float32 in [0, 1] on the device, `label`
                (B, H, W) int64, `id` list[str], `annotated` (B,) bool; `weight` (B, H, W) float32
                with `separation_weight` > 0).
            generator: generator for every random draw of this step.
            stage: name of the current `Stage`.

        Returns:
            One scalar loss per optimiser name of the stage, plus optional extra scalars to log
            under keys "log/<name>" (never back-propagated). A loss that does not require grad
            skips its optimiser for this step (`train.loop.apply_losses`).
        """

    def stages(self) -> list[Stage]:
        """Return the training stages; default: one stage "main" with one Adam optimiser "model"."""
        return [Stage(name="main",
                      optimizers={"model": OptimizerSpec([p for p in self.parameters() if p.requires_grad],
                                                         self.cfg.lr)},
                      steps=self.cfg.steps, batch_size=self.cfg.batch_size, epochs=self.cfg.epochs,
                      val_every=self.cfg.val_every)]

    @abstractmethod
    def validation_score(self, batches: Iterable[dict[str, Any]], generator: torch.Generator,
                         stage: str) -> float:
        """Return the validation score of the current weights (higher is better)."""

    def on_stage_start(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """Hook run once before a stage's first step (not again when a run resumes inside it)."""

    def on_stage_end(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """Hook run once after a stage ends (after the best weights are restored)."""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) float32 in [0, 1] to the network input; shared by fit and predict."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        return images.float()

    # ------------------------------------------------------------------ run folder
    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the weights needed at inference (default: the whole state dict)."""
        return dict(self.state_dict())

    def load_inference_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights produced by `inference_state_dict` (keys must match exactly)."""
        expected = set(self.inference_state_dict())
        got = set(state)
        if expected != got:
            missing, extra = sorted(expected - got)[:5], sorted(got - expected)[:5]
            from ldiffusion.core.errors import CheckpointError

            raise CheckpointError(f"weights do not match method {self.name!r}: missing {missing}, "
                                  f"unexpected {extra}")
        self.load_state_dict(state, strict=False)

    def run_info(self) -> dict[str, Any]:
        """Return the `config.json` content."""
        return {
            "method": self.name,
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "in_channels": self.in_channels,
            "ldiffusion_version": ldiffusion.__version__,
            **self.extra_info,
        }

    def save(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (inference weights) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory / "model.safetensors", self.inference_state_dict())
        write_json(directory / "config.json", self.run_info())

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU when there is none)."""
        for t in [*self.parameters(), *self.buffers()]:
            return t.device
        return torch.device("cpu")


def _as_float(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_as_float(o) for o in out)
    return out


def inference_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a `Segmenter` prediction method under the config's `precision`; floating outputs in float32."""

    @functools.wraps(fn)
    def wrapper(self: Trainable, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.device, self.cfg.precision):
            out = fn(self, *args, **kwargs)
        return _as_float(out)

    return wrapper


def warmup_ema_decay(decay: float, n: int) -> float:
    """Return the decay of the n-th average step (n = 0, 1, ...) with timm's warm-up:
    min(decay, (1 + n) / (10 + n)).

    Example:
        >>> warmup_ema_decay(0.99, 0), warmup_ema_decay(0.99, 10_000)
        (0.1, 0.99)
    """
    return min(decay, (1.0 + n) / (10.0 + n))


@torch.no_grad()
def fold_ema(ema: nn.Module, live: nn.Module, decay: float, *, average_buffers: bool = False) -> None:
    """One exponential-moving-average step: ema <- decay * ema + (1 - decay) * live for parameters.

    Buffers are copied from ``live``, or with ``average_buffers`` the floating-point ones (BatchNorm
    running means and variances) are averaged like the parameters and the others copied, so that the
    averaged weights meet statistics of the same steps (timm's `ModelEmaV2` practice).
    """
    for pe, p in zip(ema.parameters(), live.parameters(), strict=True):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), live.buffers(), strict=True):
        if average_buffers and be.is_floating_point():
            be.lerp_(b, 1.0 - decay)
        else:
            be.copy_(b)


class ClassCounting:
    """Mixin of a `Segmenter` with class-balanced training: running pixel counts and their weights.

    The host sets ``self.class_counts`` with `init_class_counts` in its ``__init__`` (a float64
    (K,) buffer when on, None when off; it is part of `state_dict`, hence of `train_state.pt`, so a
    resumed run continues with the same counts) and has ``cfg.class_weight_max``.
    """

    class_counts: torch.Tensor | None
    num_classes: int
    cfg: MethodConfig

    def init_class_counts(self, on: bool) -> None:
        """Register the `class_counts` buffer: zeros (K,) float64 when `on`, else None (no buffer at all)."""
        assert isinstance(self, nn.Module)
        counts = torch.zeros(self.num_classes, dtype=torch.float64) if on else None
        self.register_buffer("class_counts", counts)

    @torch.no_grad()
    def update_class_counts(self, label: torch.Tensor, ignore_index: int = 255) -> None:
        """Add the labelled pixels of a training batch (B, H, W) to `class_counts` (no-op when off).

        Under torch.distributed the batch counts are summed over the ranks first, so every rank
        holds the counts of the global batch.
        """
        if self.class_counts is None:
            return
        counts = class_pixel_counts(label, self.num_classes, ignore_index).to(self.class_counts.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.class_counts += counts

    def class_weight_vector(self) -> torch.Tensor | None:
        """Return w_c = 1 / (K' f_c) clipped to ``cfg.class_weight_max`` (K,) float32, or None when off.

        `losses.class_balance.inverse_frequency_weights` of `class_counts`.
        """
        if self.class_counts is None:
            return None
        max_weight = float(self.cfg.class_weight_max)  # type: ignore[attr-defined]
        return inverse_frequency_weights(self.class_counts, max_weight).to(self.class_counts.device)


class Segmenter(Trainable):
    """A trainable semantic segmenter: images in, class probabilities out."""

    score_name: ClassVar[str] = "val_dice"
    #: H and W of the network input must be multiples of this (the tile predictor pads to it).
    size_divisor: int = 1
    #: the network's receptive field exceeds its training crop: predict with larger tiles
    #: (`methods.sliding.default_tile_px`).
    wide_context: bool = False

    @abstractmethod
    def predict_proba(self, images: torch.Tensor, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Return class probabilities (B, K, H, W) summing to 1 over K.

        Args:
            images: (B, C, H, W) float32 in [0, 1]; H, W multiples of `size_divisor`.
            generator: generator of stochastic methods (they average `n_samples` draws).
        """

    def predict_with_uncertainty(self, images: torch.Tensor, *, generator: torch.Generator | None = None,
                                 n_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(probs (B, K, H, W), uncertainty (B, H, W))`.

        The default (deterministic methods) is the normalised entropy of `probs`, in [0, 1].
        Stochastic methods override this with a spread over `n_samples` draws.
        """
        probs = self.predict_proba(images, generator=generator)
        ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
        return probs, ent / max(math.log(probs.shape[1]), 1e-12)

    def predict(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return class maps (B, H, W) int64 = argmax of `predict_proba`."""
        return self.predict_proba(images, generator=generator).argmax(1)

    def validation_score(self, batches: Iterable[dict[str, Any]], generator: torch.Generator,
                         stage: str) -> float:
        """Mean foreground Dice over the validation set (dataset-level), predicted as `predict` does.

        Each image goes through `methods.sliding.sliding_window_proba` with its default tile, the
        path of `ldiffusion predict`, so validation ranks exactly the output a user gets.
        """
        from ldiffusion.methods.sliding import sliding_window_proba
        from ldiffusion.train.validation import DiceAccumulator

        acc = DiceAccumulator(self.num_classes)
        with torch.no_grad():
            for batch in batches:
                for image, label in zip(batch["image"], batch["label"], strict=True):
                    probs = sliding_window_proba(self, image[None], generator=generator)
                    acc.update(probs.argmax(0)[None], label[None].cpu())
        return acc.mean_foreground_dice()
