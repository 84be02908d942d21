"""L-Diffusion feature computation and inference: the chain, the segmenter pass and the iterative re-runs.

`LDiffusionInference` is the inference half of `ldiffusion.methods.ldiffusion.LDiffusionMethod` (a mixin:
it uses the method's ``ae``, ``unet``, ``seg``, ``process`` and ``cfg``). Nothing here reads a label:

* ``features`` runs the chain (`ldiffusion_features.feature_stack`) with the shared schedule, or with
  per-location class schedules when given a ``component_map``; with ``feature_norm="fixed"`` the AE and
  U-Net normalise with their calibrated statistics (`ldiffusion_norm`).
* ``component_schedule="per_class_iterative"``: ``predict_proba`` runs the chain with the shared schedule,
  segments, reduces the predicted class map to latent resolution (majority vote), runs the chain again
  with each location's predicted class schedule and segments again, ``per_class_iterations`` times. Every
  pass of a tile uses the same noise seeds, so the passes differ only in the schedules.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldiffusion.core.io import save_torch
from ldiffusion.core.rng import derive_seed
from ldiffusion.diffusion.schedules import reduce_labels_majority
from ldiffusion.methods.base import inference_autocast
from ldiffusion.methods.ldiffusion_config import LDiffusionConfig
from ldiffusion.methods.ldiffusion_features import feature_cache_path, feature_stack
from ldiffusion.methods.ldiffusion_norm import (
    NormMode,
    finish_calibration,
    norm_mode,
    set_norm_slot,
)

__all__ = ["LDiffusionInference"]


class LDiffusionInference:
    """Feature stacks, segmenter pass and `predict_proba` of L-Diffusion (mixin of `LDiffusionMethod`)."""

    cfg: Any
    ae: nn.Module
    unet: nn.Module
    seg: nn.Module
    process: Any
    num_classes: int
    size_divisor: int
    norm_calibrated: torch.Tensor

    # ------------------------------------------------------------------ normalisation context
    def _norm_context(
        self, images: torch.Tensor, mode: NormMode | None = None
    ) -> AbstractContextManager[None]:
        """Return the normalisation mode context of a feature computation on `images` (B, 3, H, W)."""
        cfg: LDiffusionConfig = self.cfg
        if mode is None:
            fixed = cfg.feature_norm == "fixed" and bool(self.norm_calibrated)
            mode = "fixed" if fixed else "tile"
        return norm_mode((self.ae, self.unet), mode, image_px=tuple(images.shape[-2:]), crop_px=cfg.crop_px)

    def _on_step(self, k: int) -> None:
        set_norm_slot((self.ae, self.unet), k)

    def component_table(self) -> torch.Tensor:
        """Return the (N+1, T_train) float64 ᾱ table of the class schedules (row N: the base schedule)."""
        return self._component_schedule().table  # type: ignore[attr-defined]

    def _chain_features(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """`feature_stack` of `images` (B, 3, H, W) with the chain settings of the config (T, t_start,
        eta, feature mode, decode target, channels); `kwargs` add the per-call ones (seeds or
        generators, z0, component map, gradients)."""
        cfg = self.cfg
        return feature_stack(self.ae, self.unet, self.process, images, steps=cfg.steps, t_start=cfg.t_start,
                             eta=cfg.eta, feature_mode=cfg.feature_mode, decode_target=cfg.decode_target,
                             channels=cfg.feature_channels, **kwargs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Return scaled latents s·E(2x-1).mean (B, c, h, w) of images in [0, 1] (no gradients)."""
        with torch.no_grad():
            return self.ae.encode(self.preprocess(images) * 2.0 - 1.0).mean * float(self.ae.scaling_factor)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ features
    def features(
        self,
        images: torch.Tensor,
        seeds: Sequence[int],
        component_map: torch.Tensor | None = None,
        *,
        mode: NormMode | None = None,
    ) -> torch.Tensor:
        """Return the feature stack (B, T·m, H, W), averaged over ``feature_draws`` draws, without gradients.

        Args:
            images: (B, 3, H, W) in [0, 1].
            seeds: one noise seed per image (draw d uses ``derive_seed(seed, d)`` for d > 0).
            component_map: (B, h, w) class ids at latent resolution for per-location schedules (a
                prediction at inference, training labels only in stage 2); None = shared schedule.
            mode: normalisation mode; None = "fixed" when ``feature_norm="fixed"`` and calibrated, else
                "tile".
        """
        cfg: LDiffusionConfig = self.cfg
        if not cfg.seg_trajectory and mode != "calibrate":  # ablation control: no chain, zeros
            b, _, h, w = images.shape
            return images.new_zeros(b, cfg.steps * cfg.maps_per_step, h, w)
        table = self.component_table() if component_map is not None else None
        with torch.no_grad(), self._norm_context(images, mode):
            z0 = self.encode(images)
            acc = None
            for d in range(cfg.feature_draws):
                sd = list(seeds) if d == 0 else [derive_seed(s, d) for s in seeds]
                f = self._chain_features(images, seeds=sd, z0=z0, component_map=component_map,
                                         component_table=table, on_step=self._on_step)
                acc = f if acc is None else acc + f
            assert acc is not None
            return acc / cfg.feature_draws

    def _train_features(
        self, images: torch.Tensor, ids: Sequence[str], component_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return stage-2 feature stacks (seeds per tile id), from ``feature_cache`` when set."""
        cfg: LDiffusionConfig = self.cfg
        seeds = [derive_seed(cfg.seed, "features", i) for i in ids]
        if cfg.feature_cache is None:
            return self.features(images, seeds, component_map)
        cache = Path(cfg.feature_cache)
        cache.mkdir(parents=True, exist_ok=True)
        out = []
        for b, case_id in enumerate(ids):
            h = hashlib.sha1(images[b].detach().cpu().numpy().tobytes())
            cm = component_map[b : b + 1] if component_map is not None else None
            if cm is not None:
                h.update(b"components" + cm.cpu().numpy().tobytes())
            path = feature_cache_path(cache, case_id, h.hexdigest()[:16])
            if path.is_file():
                out.append(torch.load(path, map_location=images.device, weights_only=True)[None])
                continue
            f = self.features(images[b : b + 1], seeds[b : b + 1], cm)
            save_torch(path, f[0].cpu())
            out.append(f)
        return torch.cat(out)

    def calibrate_feature_norms(self, batches: Any, max_batches: int) -> int:
        """Record the per-step GroupNorm statistics of the feature chain on up to `max_batches` batches.

        Returns:
            The number of tiles seen (0: nothing recorded, the layers keep normalising per tile).
        """
        cfg: LDiffusionConfig = self.cfg
        seen = 0
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            images = batch["image"].to(self.device)  # type: ignore[attr-defined]
            seeds = [derive_seed(cfg.seed, "calibrate", i, b) for b in range(images.shape[0])]
            self.features(images, seeds, mode="calibrate")
            seen += images.shape[0]
        finish_calibration(self.ae, self.unet)
        if seen:
            self.norm_calibrated.fill_(True)
        return seen

    # ------------------------------------------------------------------ segmenter
    def segment(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Return segmenter logits (B, K, H, W) of a feature stack (B, T·m, H, W) in [0, 1] (+ the images)."""
        x = features * 2.0 - 1.0
        if self.cfg.with_image:
            x = torch.cat([x, images * 2.0 - 1.0], dim=1)
        return self.seg(x)

    def component_map_of(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the latent-resolution class map (B, h, w) of logits (B, K, H, W) (majority vote)."""
        f = int(self.ae.downsample_factor)
        return reduce_labels_majority(logits.argmax(1), f, self.num_classes)

    def _logits(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Return logits of one noise draw: shared-schedule pass, then the iterative re-runs (no labels)."""
        cfg: LDiffusionConfig = self.cfg
        logits = self.segment(self.features(images, seeds), images)
        if cfg.component_schedule == "per_class_iterative":
            for _ in range(cfg.per_class_iterations):
                comp = self.component_map_of(logits)
                logits = self.segment(self.features(images, seeds, comp), images)
        return logits

    def _draw_seeds(self, generator: torch.Generator | None, n: int) -> list[int]:
        if generator is None:
            base = derive_seed(self.cfg.seed, "predict")
        else:
            base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return [derive_seed(base, "tile", b) for b in range(n)]

    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        d = self.size_divisor
        if images.ndim != 4 or h % d or w % d:
            raise ValueError(
                f"expected (B, 3, H, W) with H, W divisible by {d}, got {tuple(images.shape)}; "
                f"pad to ({-(-h // d) * d}, {-(-w // d) * d})"
            )

    def _sample_probs(
        self, images: torch.Tensor, generator: torch.Generator | None, n_samples: int
    ) -> list[torch.Tensor]:
        self._check_size(images)
        images = self.preprocess(images)  # type: ignore[attr-defined]
        probs = []
        with torch.no_grad():
            for s in range(n_samples):
                seeds = (
                    self._draw_seeds(generator, images.shape[0])
                    if s == 0 or generator is not None
                    else [derive_seed(x, s) for x in self._draw_seeds(None, images.shape[0])]
                )
                probs.append(torch.softmax(self._logits(images, seeds).float(), dim=1))
        return probs

    @inference_autocast
    def predict_proba(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return class probabilities (B, K, H, W), the mean over ``n_samples`` noise draws.

        Args:
            images: (B, 3, H, W) float32 in [0, 1], H and W multiples of `size_divisor`.
            generator: drives the per-tile noise seeds (None: seeds derived from the config seed).
        """
        return torch.stack(self._sample_probs(images, generator, self.cfg.n_samples)).mean(0)

    @inference_autocast
    def predict_with_uncertainty(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None, n_samples: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(probs (B, K, H, W), uncertainty (B, H, W) in [0, 1])` over S noise draws.

        With S > 1 the uncertainty is the spread over the draws: the mutual information
        H(mean p) - mean H(p), divided by log K. With S = 1 it is the normalised entropy of p.
        """
        S = int(n_samples if n_samples is not None else max(self.cfg.n_samples, 1))
        draws = torch.stack(self._sample_probs(images, generator, S))  # (S, B, K, H, W)
        probs = draws.mean(0)

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * torch.log(p.clamp_min(1e-12))).sum(-3)

        norm = max(math.log(probs.shape[1]), 1e-12)
        unc = entropy(probs) - entropy(draws).mean(0) if S > 1 else entropy(probs)
        return probs, (unc / norm).clamp(0.0, 1.0)
