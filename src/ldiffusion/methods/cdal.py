"""cDAL (`"cdal"`): conditional diffusion with discriminator spatial attention and a latent (MICCAI 2024).

METHODS.md Part 3. The label itself is diffused (one-hot in [-1, 1]; a binary task uses one channel
2m - 1) with cDAL's few-step VP schedule (β_min 0.1, β_max 20, T = 2..4). A generator
x_θ(x_t, t, z, I) predicts x̂0 (tanh) from the noisy label, the image and a random latent z; a
time-conditioned discriminator D(x_{t-1}, x_t, t) tells real Markov pairs from posterior samples
built from x̂0.

Training (one step = one D update and one G update, Algorithm 1 of the paper / the authors' code):

* D loss: softplus(-D(x_{k-1}, x_k)) + softplus(D(x̂_{k-1}, x_k)) (non-saturating logistic), plus
  R1 = γ/2 · E‖∇_{x_{k-1}} D‖² on real pairs every ``lazy_r1`` steps (not rescaled; code-only).
  The fake x̂_{k-1} is a posterior sample from G's x̂0, computed under no_grad.
* G loss (paper eq. 4): mean((x0 - x_θ(x_k^att, k-1, z, I))²) over annotated pixels, where
  x_k^att is a fresh forward sample of A ⊙ x0 and A is the spatial attention map (below). The
  target is the *un-attended* x0. Optional adversarial term ``lambda_adv`` · softplus(-D(x̂_{k-1},
  x_k^att)) (off by default, as in the paper: D shapes G only through A).

Class balancing (issue 20, not in the paper; off in the `tiny` and `paper` presets): with
``class_weights="inverse_freq"`` the squared error of every pixel is weighted by w_c of its class,
w_c = 1 / (K' f_c) clipped to ``class_weight_max`` (`losses.class_balance.inverse_frequency_weights`;
before clipping the pixel-average weight is 1). The frequencies f_c are running counts of the
training label pixels seen so far, this step's batch included (the `class_counts` buffer, kept in
`train_state.pt`, so a resumed run continues with the same counts; all-reduced under
torch.distributed). A class absent so far has no pixel in the batch either, so early steps only
see noisier weights, never missing ones. Optional auxiliary terms on the class probabilities
softmax(logits(x̂0) / ``aux_temperature``) (one channel: logits [-x̂0, x̂0]):
``aux_ce`` x cross-entropy (class-weighted when the weights are on) and ``aux_dice`` x soft Dice
loss over the foreground classes present (`losses.dice.soft_dice_loss`).

Attention map A (METHODS Part 3 §2 / §8.2): channel statistic of D's feature map at the resolution
``attn_scale`` (px at ``crop_px``; or ``attn_index`` into `CDALDiscriminator.get_features`),
computed under no_grad on a fresh *real* pair, upsampled bilinearly to the label size and broadcast
over label channels. The authors' code uses the raw channel mean, which can be negative (flipping
the label sign) and has an arbitrary scale. **Our default** is ``attn_abs=True`` (mean of
|features|, the code's commented-out variant) followed by ``attn_norm="minmax"`` (per-sample
rescale to [0, 1]; a constant map becomes 1), so A is non-negative and its scale does not depend
on D's initialisation. The code's variant is ``attn_abs=False, attn_norm="none"``; ``"sigmoid"``
is the third choice. ``use_attention=False`` sets A ≡ 1 (and D is then not trained unless
``lambda_adv > 0``); ``use_latent=False`` sets z ≡ 0 in training and sampling.

Interpretation forced by the shared loop: `fit` computes all losses of a step from the weights
before the step and then steps each optimiser on its own loss. So the G step's attention comes
from D *before* this step's D update (a one-step lag against the code, which recomputes A with
the just-updated D). Everything else follows Algorithm 1.

Inference (Alg. 2 / code): x_T ~ N(0, I); for k = T..1: x̂0 = G(x_k, k-1, z_new, I), x_{k-1} ~
q(x_{k-1}|x_k, x̂0) (k = 1 returns x̂0). ``n_samples`` chains per image; per channel
p = mean_n clamp((x̂0 + 1)/2, 0, 1). `predict_proba` returns p normalised over classes (binary:
[1 - p, p]); the class map (`decision`) is ``"argmax_mean"`` (argmax of p, default) or
``"mean_round"`` (the code: round each channel at 0.5, then argmax; 0.5 rounds to 0). Uncertainty
= per-pixel vote spread = 1 - fraction of samples whose own class map agrees with the final class.
D is not needed at inference and is not part of `model.safetensors`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.config import check_range
from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.rng import make_generator
from ldiffusion.diffusion.samplers.vp_posterior import VPPosterior
from ldiffusion.losses.dice import soft_dice_loss
from ldiffusion.methods.base import (
    STAIN_AUGMENTATION,
    ClassCounting,
    MethodConfig,
    OptimizerSpec,
    Segmenter,
    Stage,
    fold_ema,
    inference_autocast,
    warmup_ema_decay,
)
from ldiffusion.nets.cdal import CDALDiscriminator, CDALGenerator, cdal_preset
from ldiffusion.nets.cdal_resunet import CDALResUNetGenerator

logger = logging.getLogger(__name__)

__all__ = ["CDALConfig", "CDALMethod", "r1_penalty"]

IGNORE = 255
# MoNuSeg per-channel statistics on the 0-255 scale (authors' code).
_MONUSEG_MEAN = (142.07, 98.48, 132.96)
_MONUSEG_STD = (65.78, 57.05, 57.78)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CDALConfig(MethodConfig):
    """cDAL config (defaults = the "tiny" preset; METHODS.md Part 3 §5, §7).

    Attributes:
        T: diffusion steps (2 or 4 in the paper).
        beta_min, beta_max: VP schedule.
        g_backbone: generator network: "ncsnpp" (the paper's NCSN++ U-Net, `CDALGenerator`) or
            "resnet18" / "resnet34" (not in the paper: a residual-encoder U-Net on [x_t, I] with
            FiLM conditioning on t and z, `CDALResUNetGenerator`; the ``g_*`` layout keys below
            then do not apply).
        g_nf, g_ch_mult, g_num_res_blocks, g_attn_resolutions, g_enc_blocks: generator layout
            (attention resolutions in px at ``crop_px``; encoder blocks = L_enc x R_enc).
        nz, z_emb_dim, n_mlp: latent size, style width, mapping depth.
        dropout: dropout in the generator's residual blocks.
        d_ngf, d_t_emb_dim, d_n_down, d_variant, d_init: discriminator layout and init
            ("normal" = N(0, 0.02) conv weights, monu/lung script).
        lr_g, lr_d: Adam learning rates (the shared ``lr`` field is not used by cDAL).
        betas: Adam betas of both optimisers (the paper's GAN setting 0.5, 0.9).
        g_betas: Adam betas of the generator alone (None = ``betas``, the paper). Not in the paper:
            β1 = 0.5 suits the adversarial game of D, while G is trained by a supervised regression.
        r1_gamma: R1 weight γ (penalty γ/2 · E‖∇D‖²); 0 turns it off.
        lazy_r1: apply R1 every this many discriminator updates (1 = every update); not rescaled.
        d_every: update D on every this-many-th training step only (1 = every step, the paper);
            G trains every step, its attention map then comes from a D up to ``d_every - 1`` steps
            old. Not in the paper: D's two passes with gradient cost more than G's step on CPU.
        attn_scale: resolution (px at ``crop_px``) of the D feature map used for attention; the
            deepest feature map at that resolution is used.
        attn_index: explicit index into ``D.get_features`` (overrides ``attn_scale``).
        attn_abs: channel mean of |features| (default, non-negative) instead of the raw mean (code).
        attn_norm: "minmax" (default, per-sample to [0, 1]), "sigmoid" or "none" (code).
        use_attention: ablation switch; False sets A ≡ 1.
        use_latent: ablation switch; False sets z ≡ 0 in training and sampling.
        lambda_adv: weight of the optional adversarial generator term (0 = paper eq. 4).
        decision: "argmax_mean" (argmax of the mean probabilities) or "mean_round" (code).
        image_norm: "monuseg" ((255 v - mean) / std, authors' statistics) or "unit" (2 v - 1).
        invert_labels: binary tasks only: foreground = -1 (the CXR code's polarity).
        binary_one_channel: a 2-class task diffuses one channel (paper); False uses 2 one-hot channels.
        class_weights: "none" (paper: plain MSE) or "inverse_freq" (per-pixel weight w_c = 1/(K' f_c)
            of its class from the running training pixel counts, clipped to ``class_weight_max``).
        class_weight_max: upper clip of the class weights (>= 1).
        aux_ce: weight of an auxiliary cross-entropy on softmax(logits(x̂0) / ``aux_temperature``)
            (0 = off, paper).
        aux_dice: weight of an auxiliary soft Dice loss on the same probabilities (0 = off, paper).
        aux_temperature: temperature of that softmax; 0.25 maps the target 2·onehot - 1 to a
            probability of the true class >= 0.99 for up to 20 classes.
        ema: decay of an exponential moving average of the generator weights, used at inference and
            validation (None = off: the paper and the MoNuSeg / CXR code; the Hippocampus code: 0.999).
        ema_warmup: timm's warm-up of that average: the n-th fold (n = 0, 1, ...) uses the decay
            min(ema, (1 + n) / (10 + n)), so a run of a few hundred steps is not dominated by its first
            weights (False = a constant decay, the Hippocampus code). Not in the paper; as the U-Net's `ema`.
        ema_buffers: what the average does with the generator's buffers (its BatchNorm statistics):
            "copy" them from the live generator (the Hippocampus code) or "average" the floating-point
            ones like the weights, so that averaged weights meet statistics of the same steps (timm's
            practice, as the U-Net's `ema`).
        val_n_samples: chains per image in the validation predictions that choose the checkpoint
            (None = ``n_samples``, so validation scores what `predict` outputs). Not in the paper: each
            chain is T generator passes, so 5 chains make validation about a fifth of a CPU run's clock.
    """

    T: int = 2
    beta_min: float = 0.1
    g_backbone: Literal["ncsnpp", "resnet18", "resnet34"] = "ncsnpp"
    beta_max: float = 20.0
    g_nf: int = 16
    g_ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    g_num_res_blocks: int = 1
    g_attn_resolutions: tuple[int, ...] = (16,)
    g_enc_blocks: int = 1
    nz: int = 16
    z_emb_dim: int = 32
    n_mlp: int = 2
    dropout: float = 0.0
    d_ngf: int = 8
    d_t_emb_dim: int = 32
    d_n_down: int = 4
    d_variant: Literal["large", "small"] = "large"
    d_init: Literal["normal", "default"] = "normal"
    lr_g: float = 2e-4
    lr_d: float = 1e-4
    # tuple[float, ...] (+ length check): core.config._coerce swaps (type, value) for fixed-length tuples
    betas: tuple[float, ...] = (0.5, 0.9)
    g_betas: tuple[float, ...] | None = None
    r1_gamma: float = 1.0
    lazy_r1: int = 2
    d_every: int = 1
    attn_scale: int = 16
    attn_index: int | None = None
    attn_abs: bool = True
    attn_norm: Literal["none", "minmax", "sigmoid"] = "minmax"
    use_attention: bool = True
    use_latent: bool = True
    lambda_adv: float = 0.0
    decision: Literal["argmax_mean", "mean_round"] = "argmax_mean"
    image_norm: Literal["monuseg", "unit"] = "monuseg"
    invert_labels: bool = False
    binary_one_channel: bool = True
    n_samples: int = 5
    grad_clip: float | None = None
    class_weights: Literal["none", "inverse_freq"] = "none"
    class_weight_max: float = 10.0
    aux_ce: float = 0.0
    aux_dice: float = 0.0
    aux_temperature: float = 0.25
    ema: float | None = None
    ema_warmup: bool = False
    ema_buffers: Literal["copy", "average"] = "copy"
    val_n_samples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_n_samples is not None:
            check_range("val_n_samples", self.val_n_samples, 1)
        check_range("class_weight_max", self.class_weight_max, 1.0)
        check_range("aux_ce", self.aux_ce, 0.0)
        check_range("aux_dice", self.aux_dice, 0.0)
        check_range("aux_temperature", self.aux_temperature, 0.0, lo_open=True)
        if self.ema is not None:
            check_range("ema", self.ema, 0.0, 1.0, lo_open=True)
            if self.ema >= 1.0:
                raise ConfigError(f"ema={self.ema} should be < 1 (or null to turn the EMA off)")
        check_range("T", self.T, 1, 1000)
        check_range("beta_min", self.beta_min, 0.0, lo_open=True)
        if self.beta_max < self.beta_min:
            raise ConfigError(f"beta_max={self.beta_max} should be >= beta_min={self.beta_min}")
        for key in ("g_nf", "g_num_res_blocks", "nz", "z_emb_dim", "d_ngf", "d_t_emb_dim", "d_n_down",
                    "lazy_r1", "d_every", "attn_scale"):
            check_range(key, getattr(self, key), 1)
        check_range("g_enc_blocks", self.g_enc_blocks, 0)
        check_range("n_mlp", self.n_mlp, 0)
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_range("lr_g", self.lr_g, 0.0, lo_open=True)
        check_range("lr_d", self.lr_d, 0.0, lo_open=True)
        for key, pair in (("betas", self.betas), ("g_betas", self.g_betas)):
            if pair is None:
                continue
            if len(pair) != 2:
                raise ConfigError(f"{key}={list(pair)} should be two numbers [beta1, beta2]")
            for i, b in enumerate(pair):
                check_range(f"{key}[{i}]", b, 0.0, 1.0)
        check_range("r1_gamma", self.r1_gamma, 0.0)
        check_range("lambda_adv", self.lambda_adv, 0.0)
        if not self.g_ch_mult or any(m < 1 for m in self.g_ch_mult):
            raise ConfigError(f"g_ch_mult={self.g_ch_mult!r} should be a non-empty list of positive integers")
        g_div = (2 ** (len(self.g_ch_mult) - 1) if self.g_backbone == "ncsnpp"
                 else CDALResUNetGenerator.size_divisor)
        if self.crop_px % g_div or self.crop_px % 2**self.d_n_down:
            raise ConfigError(f"crop_px={self.crop_px} should be divisible by the generator's {g_div} "
                              f"and by 2**d_n_down={2**self.d_n_down}")
        if self.attn_index is not None:
            check_range("attn_index", self.attn_index, 0)


#: optimiser settings common to every preset (batch, generator and discriminator learning rates)
_SHARED_TRAINING: dict[str, Any] = {"batch_size": 4, "lr_g": 2e-4, "lr_d": 1e-4}


def _preset(name: str, **extra: Any) -> dict[str, Any]:
    p = cdal_preset(name)
    g, d = p["generator"], p["discriminator"]
    out = {"g_nf": g["nf"], "g_ch_mult": list(g["ch_mult"]), "g_num_res_blocks": g["num_res_blocks"],
           "g_attn_resolutions": list(g["attn_resolutions"]), "g_enc_blocks": g["enc_blocks"], "nz": g["nz"],
           "z_emb_dim": g["z_emb_dim"], "n_mlp": g["n_mlp"], "dropout": g["dropout"], "d_ngf": d["ngf"],
           "d_t_emb_dim": d["t_emb_dim"], "d_n_down": d["n_down"], "d_variant": d["variant"],
           "crop_px": p["crop_px"]}
    out.update(extra)
    return out


def r1_penalty(d_real: Tensor, x_real: Tensor, gamma: float) -> Tensor:
    """Return the R1 penalty γ/2 · mean_b ‖∂ Σ d_real / ∂ x_real[b]‖² (graph kept for backprop).

    Args:
        d_real: discriminator logits (B, 1) computed from ``x_real``.
        x_real: the input (B, ...) the gradient is taken against; must require grad.
        gamma: weight γ.

    Returns:
        Scalar tensor (0 when D does not depend on ``x_real``).
    """
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True, allow_unused=True)
    if grad is None:
        return d_real.sum() * 0.0
    return gamma / 2.0 * grad.flatten(1).pow(2).sum(1).mean()


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev).to(device)


class CDALMethod(ClassCounting, Segmenter):
    """cDAL segmenter: generator ``self.gen`` (saved) + discriminator ``self.disc`` (training only).

    Example:
        >>> from ldiffusion.methods.cdal import CDALConfig, CDALMethod
        >>> m = CDALMethod(CDALConfig(n_samples=1), num_classes=2)
        >>> m.predict_proba(torch.rand(1, 3, 64, 64), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([1, 2, 64, 64])
    """

    name: ClassVar[str] = "cdal"
    ema_updates: Tensor | None
    config_cls: ClassVar[type[MethodConfig]] = CDALConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": _preset("tiny", **_SHARED_TRAINING, T=2, lazy_r1=2, steps=30, n_samples=2, attn_scale=16,
                        val_every=10, ckpt_every=10),
        # small departs from the paper: class-balanced MSE + Dice on x̂0 (issue 20; docs/methods.md);
        # class_weight_max 100 chosen over 10 on CoNSeP validation (0.190 vs 0.162, docs/results.md);
        # a ResNet-18 U-Net generator, D ngf 8 and lr_g 1e-3 chosen on CoNSeP validation at 30 minutes
        # (0.297 vs 0.190; docs/results.md, 2026-12-06 eleventh run); predict averages 10 chains,
        # chosen over 5 and 20 on CoNSeP validation, two seeds (twenty-fourth run); validation keeps 5,
        # so training and the checkpoint choice are unchanged
        "small": _preset("small", **{**_SHARED_TRAINING, "lr_g": 1e-3}, precision="auto", T=2, lazy_r1=10,
                         steps=300, n_samples=10, val_n_samples=5, attn_scale=32, val_every=100,
                         ckpt_every=100, aux_dice=1.0,
                         class_weights="inverse_freq", class_weight_max=100.0, g_backbone="resnet18", d_ngf=8,
                         **STAIN_AUGMENTATION),
        # MoNuSeg column: 12000 epochs x 7 iterations; the cosine LR decay of the code is not applied.
        "paper": _preset("paper", **_SHARED_TRAINING, precision="auto", T=4, lazy_r1=10, steps=84000,
                         n_samples=5, attn_scale=32, val_every=700, ckpt_every=700, **STAIN_AUGMENTATION),
    }

    def __init__(self, cfg: MethodConfig, num_classes: int, in_channels: int = 3,
                 class_names: list[str] | None = None) -> None:
        super().__init__(cfg, num_classes, in_channels, class_names)
        if not isinstance(cfg, CDALConfig):
            raise ConfigError(f"cdal needs a CDALConfig, got {type(cfg).__name__}")
        if num_classes < 2:
            raise ConfigError(f"cdal needs num_classes >= 2 (background + foreground), got {num_classes}")
        if cfg.invert_labels and not self._one_channel(cfg, num_classes):
            raise ConfigError("invert_labels=true needs a binary task with binary_one_channel=true")
        self.label_channels = 1 if self._one_channel(cfg, num_classes) else num_classes
        self.gen: CDALGenerator | CDALResUNetGenerator
        if cfg.g_backbone == "ncsnpp":
            self.gen = CDALGenerator(
                self.label_channels, in_channels, nf=cfg.g_nf, ch_mult=cfg.g_ch_mult,
                num_res_blocks=cfg.g_num_res_blocks, attn_resolutions=cfg.g_attn_resolutions,
                enc_blocks=cfg.g_enc_blocks, nz=cfg.nz, z_emb_dim=cfg.z_emb_dim, n_mlp=cfg.n_mlp,
                dropout=cfg.dropout, image_size=cfg.crop_px)
        else:
            self.gen = CDALResUNetGenerator(self.label_channels, in_channels, encoder=cfg.g_backbone,
                                            nz=cfg.nz, z_emb_dim=cfg.z_emb_dim, n_mlp=cfg.n_mlp)
        self.disc = CDALDiscriminator(self.label_channels, ngf=cfg.d_ngf, t_emb_dim=cfg.d_t_emb_dim,
                                      n_down=cfg.d_n_down, variant=cfg.d_variant, init=cfg.d_init)
        self.process = VPPosterior(cfg.T, cfg.beta_min, cfg.beta_max)
        self.size_divisor = self.gen.size_divisor
        self._chains_override: int | None = None  # val_n_samples while `validation_score` runs
        self.gen_ema: nn.Module | None = None
        if cfg.ema is not None:
            self.gen_ema = copy.deepcopy(self.gen)
            for p in self.gen_ema.parameters():
                p.requires_grad_(False)
        # 1 when an optimiser step has run since the EMA was last updated (part of train_state.pt)
        self.register_buffer("ema_pending", torch.zeros((), dtype=torch.int64))
        # folds made so far (ema_warmup only, so that run folders written without it still load)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64)
                             if cfg.ema is not None and cfg.ema_warmup else None)
        self.attn_feature_index = self._resolve_attn_index(cfg)
        # counts training steps (lazy R1); saved in train_state.pt, not in model.safetensors
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        # running training pixel counts per class (class_weights; None = off); train_state.pt only
        self.init_class_counts(cfg.class_weights == "inverse_freq")
        if cfg.image_norm == "monuseg" and in_channels == 3:
            mean, std = torch.tensor(_MONUSEG_MEAN) / 255.0, torch.tensor(_MONUSEG_STD) / 255.0
        else:
            mean, std = torch.full((in_channels,), 0.5), torch.full((in_channels,), 0.5)
        self.register_buffer("img_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("img_std", std.view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def _one_channel(cfg: CDALConfig, num_classes: int) -> bool:
        return num_classes == 2 and cfg.binary_one_channel

    def _resolve_attn_index(self, cfg: CDALConfig) -> int:
        strides = self.disc.feature_strides
        res = [cfg.crop_px // s for s in strides]
        if cfg.attn_index is not None:
            if cfg.attn_index >= len(strides):
                raise ConfigError(f"attn_index={cfg.attn_index} is out of range; the discriminator has "
                                  f"{len(strides)} feature maps (resolutions {res} at crop_px={cfg.crop_px})")
            return cfg.attn_index
        matches = [i for i, r in enumerate(res) if r == cfg.attn_scale and cfg.crop_px % strides[i] == 0]
        if not matches:
            raise ConfigError(f"attn_scale={cfg.attn_scale} matches no discriminator feature map; at "
                              f"crop_px={cfg.crop_px} they have resolutions {res}")
        return matches[-1]

    @property
    def trains_discriminator(self) -> bool:
        """True when D is trained (attention on, or an adversarial G term)."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        return cfg.use_attention or cfg.lambda_adv > 0

    @property
    def step_period(self) -> int:
        """D updates on every ``d_every``-th step, so the work of a step repeats after ``d_every`` steps."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        return cfg.d_every if self.trains_discriminator else 1

    # ------------------------------------------------------------------ helpers
    def inference_generator(self) -> nn.Module:
        """Return the generator used at inference and validation (the EMA copy when `ema` is on)."""
        self._sync_ema()
        return self.gen_ema if self.gen_ema is not None else self.gen

    def ema_decay(self) -> float:
        """Return the decay of the next fold: ``ema``, or min(ema, (1 + n) / (10 + n)) with ``ema_warmup``."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig) and cfg.ema is not None
        return cfg.ema if self.ema_updates is None else warmup_ema_decay(cfg.ema, int(self.ema_updates))

    @torch.no_grad()
    def _sync_ema(self) -> None:
        """Fold the weights of the last optimiser step into the EMA (once per step; see ``ema_buffers``)."""
        if self.gen_ema is None or int(self.ema_pending) == 0:
            return
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        fold_ema(self.gen_ema, self.gen, self.ema_decay(), average_buffers=cfg.ema_buffers == "average")
        if self.ema_updates is not None:
            self.ema_updates += 1
        self.ema_pending.zero_()

    def preprocess(self, images: Tensor) -> Tensor:
        """Normalise images (B, C, H, W) in [0, 1] for the image encoder (see ``image_norm``)."""
        images = super().preprocess(images)
        return (images - self.img_mean) / self.img_std

    def encode_labels(self, label: Tensor) -> tuple[Tensor, Tensor]:
        """Turn class ids (B, H, W) into x0 (B, C_y, H, W) in {-1, +1} and a valid mask (B, 1, H, W).

        Binary one-channel: x0 = 2·[label == 1] - 1 (negated with ``invert_labels``). Otherwise
        x0 = 2·onehot - 1. Ignored pixels (255) get -1 in every channel and valid = 0.
        """
        if label.ndim != 3:
            raise InputError(f"cdal: expected labels (B, H, W), got {tuple(label.shape)}")
        valid = (label != IGNORE)
        lab = torch.where(valid, label, torch.zeros_like(label)).long()
        if lab.numel() and int(lab.max()) >= self.num_classes:
            raise InputError(f"cdal: label value {int(lab.max())} >= num_classes={self.num_classes}")
        if self.label_channels == 1:
            x0 = (lab == 1).float().unsqueeze(1) * 2.0 - 1.0
            cfg = self.cfg
            assert isinstance(cfg, CDALConfig)
            if cfg.invert_labels:
                x0 = -x0
        else:
            x0 = F.one_hot(lab, self.num_classes).permute(0, 3, 1, 2).float() * 2.0 - 1.0
        valid_f = valid.unsqueeze(1).float()
        x0 = torch.where(valid_f > 0, x0, torch.full_like(x0, -1.0))
        return x0, valid_f

    def sample_z(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Return z (n, nz): N(0, I) draws, or zeros when ``use_latent`` is False."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        if not cfg.use_latent:
            return torch.zeros(n, cfg.nz, device=device)
        return _randn((n, cfg.nz), generator, device)

    def attention_map(self, x_prev: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Return the attention map A (B, 1, H, W) from D's features of a (real) pair, without grad.

        A = channel mean of (|f| if ``attn_abs`` else f) for the feature map ``attn_feature_index``,
        bilinearly upsampled (align_corners=False) to x_prev's size, then ``attn_norm``
        ("minmax": per-sample (A - min)/(max - min), a constant map gives 1; "sigmoid"; "none").
        Non-negative unless ``attn_abs=False`` and ``attn_norm="none"`` (the authors' code).
        """
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        with torch.no_grad():
            f = self.disc.get_features(x_prev, xt, t)[self.attn_feature_index].float()
            a = (f.abs() if cfg.attn_abs else f).mean(1, keepdim=True)
            a = F.interpolate(a, size=x_prev.shape[-2:], mode="bilinear", align_corners=False)
            if cfg.attn_norm == "minmax":
                lo = a.amin(dim=(1, 2, 3), keepdim=True)
                span = a.amax(dim=(1, 2, 3), keepdim=True) - lo
                a = torch.where(span > 1e-12, (a - lo) / span.clamp_min(1e-12), torch.ones_like(a))
            elif cfg.attn_norm == "sigmoid":
                a = torch.sigmoid(a)
        return a.to(x_prev.dtype)

    def _random_k(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        return torch.randint(1, cfg.T + 1, (n,), generator=generator, device=generator.device).to(device)

    # ------------------------------------------------------------------ training
    def stages(self) -> list[Stage]:
        """One stage "main" with Adam optimisers "d" (discriminator, when trained) and "g" (generator)."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        opts: dict[str, OptimizerSpec] = {}
        if self.trains_discriminator:
            opts["d"] = OptimizerSpec(list(self.disc.parameters()), cfg.lr_d, (cfg.betas[0], cfg.betas[1]))
        g_betas = cfg.betas if cfg.g_betas is None else cfg.g_betas
        opts["g"] = OptimizerSpec(list(self.gen.parameters()), cfg.lr_g, (g_betas[0], g_betas[1]))
        return [Stage(name="main", optimizers=opts, steps=cfg.steps, batch_size=cfg.batch_size,
                      epochs=cfg.epochs, val_every=cfg.val_every)]

    def training_step(self, batch: dict[str, Any], generator: torch.Generator,
                      stage: str) -> dict[str, Tensor]:
        """Return {"d": L_D (+R1), "g": L_G, "log/...": diagnostics} for one batch (Algorithm 1).

        On steps where D sits out (``d_every`` > 1), "d" is a zero without grad. Both losses are
        computed from the current weights; `fit` then steps D on "d" and G on "g".
        A loop that updates D before computing G's loss (the code's exact order) can call
        `discriminator_loss` and `generator_loss` itself, in that order, with the same generator.
        """
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        self._sync_ema()
        image = self.preprocess(batch["image"])
        label = batch["label"].to(image.device)
        x0, valid = self.encode_labels(label)
        out: dict[str, Tensor] = {}
        if self.trains_discriminator:
            if int(self.train_steps) % cfg.d_every == 0:
                out.update(self.discriminator_loss(x0, image, generator))
            else:  # D sits this step out: a loss without grad leaves its optimiser untouched
                out["d"] = torch.zeros((), device=image.device)
        with torch.no_grad():
            self.train_steps += 1
            self.update_class_counts(label)
        out.update(self.generator_loss(x0, valid, image, generator, label=label))
        if self.gen_ema is not None:
            self.ema_pending.fill_(1)
        return out

    def class_logits(self, x0_hat: Tensor) -> Tensor:
        """Class logits (B, K, H, W) of predicted labels x̂0 (B, C_y, H, W), divided by ``aux_temperature``.

        One channel: [-x̂0, x̂0] (sign flipped with ``invert_labels``); otherwise x̂0 itself. Their
        softmax is the class probability of the auxiliary losses; its argmax equals the class map
        of a single sample.
        """
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        x = x0_hat.float()
        if self.label_channels == 1:
            x = -x if cfg.invert_labels else x
            x = torch.cat([-x, x], dim=1)
        return x / cfg.aux_temperature

    def discriminator_loss(self, x0: Tensor, image: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Return {"d": softplus(-D(real)) + softplus(D(fake)) [+ R1], "log/...": ...} (G frozen).

        Args:
            x0: labels (B, C_y, H, W) in {-1, +1} (`encode_labels`).
            image: normalised images (B, C_I, H, W) (`preprocess`).
            generator: generator of k, the pair noise, z and the posterior noise.

        R1 is added on every ``lazy_r1``-th D update: when ``(train_steps // d_every) % lazy_r1 == 0``
        (``train_steps`` counts `training_step` calls; D updates when ``train_steps % d_every == 0``).
        """
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        b, dev = x0.shape[0], x0.device
        out: dict[str, Tensor] = {}
        k = self._random_k(b, generator, dev)
        x_prev, x_k = self.process.q_sample_pair(x0, k, generator)
        x_prev = x_prev.detach().requires_grad_(True)  # before the D pass, for R1
        d_real = self.disc(x_prev, x_k, k - 1)
        loss_d = F.softplus(-d_real).mean()
        if cfg.r1_gamma > 0 and (int(self.train_steps) // cfg.d_every) % cfg.lazy_r1 == 0:
            r1 = r1_penalty(d_real, x_prev, cfg.r1_gamma)
            loss_d = loss_d + r1
            out["log/r1"] = r1.detach()
        with torch.no_grad():  # the fake pass never reaches G
            x0_fake = self.gen(x_k, k - 1, self.sample_z(b, generator, dev), image)
            x_prev_fake = self.process.posterior_sample(x0_fake, x_k, k, generator)
        d_fake = self.disc(x_prev_fake.detach(), x_k, k - 1)
        out["d"] = loss_d + F.softplus(d_fake).mean()
        out["log/d_real"] = d_real.detach().mean()
        out["log/d_fake"] = d_fake.detach().mean()
        return out

    def generator_loss(self, x0: Tensor, valid: Tensor, image: Tensor,
                       generator: torch.Generator, *, label: Tensor | None = None) -> dict[str, Tensor]:
        """Return {"g": eq. 4 MSE [+ lambda_adv · adversarial] [+ aux terms], "log/...": ...} (D frozen).

        Args:
            x0: labels (B, C_y, H, W) in {-1, +1}; valid: (B, 1, H, W) 1 = annotated pixel.
            image: normalised images (B, C_I, H, W).
            generator: generator of k, the pair noise and z.
            label: class ids (B, H, W) (255 = ignore); needed by ``class_weights`` and the
                auxiliary terms, which are skipped without it.

        The MSE target is the un-attended x0, averaged over annotated pixels and label channels;
        with class weights each pixel's squared error is multiplied by its class weight (the
        normaliser stays the number of annotated pixels x channels).
        """
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        b, dev = x0.shape[0], x0.device
        out: dict[str, Tensor] = {}
        k = self._random_k(b, generator, dev)
        if cfg.use_attention:
            x_prev_r, x_k_r = self.process.q_sample_pair(x0, k, generator)  # fresh real pair
            a = self.attention_map(x_prev_r, x_k_r, k - 1)
            x0_att = a * x0
            out["log/attn_min"], out["log/attn_mean"], out["log/attn_max"] = a.min(), a.mean(), a.max()
        else:
            x0_att = x0
        _, x_k_att = self.process.q_sample_pair(x0_att, k, generator)  # fresh noise
        x0_hat = self.gen(x_k_att, k - 1, self.sample_z(b, generator, dev), image)
        n_valid = valid.sum() * self.label_channels
        weights = self.class_weight_vector() if label is not None else None
        pixel_w = valid
        if weights is not None and label is not None:
            safe = torch.where(label == IGNORE, torch.zeros_like(label), label).long()
            pixel_w = weights.to(valid.dtype)[safe].unsqueeze(1) * valid
            seen = self.class_counts is not None and bool((self.class_counts > 0).any())
            out["log/w_max"] = weights[self.class_counts > 0].max() if seen else weights.max()  # type: ignore[operator]
        mse = ((x0_hat.float() - x0) ** 2 * pixel_w).sum() / n_valid.clamp_min(1.0)
        loss_g = mse
        if label is not None and (cfg.aux_ce > 0 or cfg.aux_dice > 0):
            logits = self.class_logits(x0_hat)
            if cfg.aux_ce > 0:
                if bool((label != IGNORE).any()):
                    ce = F.cross_entropy(logits, label.long(), ignore_index=IGNORE,
                                         weight=weights.float() if weights is not None else None)
                else:
                    ce = logits.sum() * 0.0
                loss_g = loss_g + cfg.aux_ce * ce
                out["log/aux_ce"] = ce.detach()
            if cfg.aux_dice > 0:
                dice = soft_dice_loss(logits, label.long(), ignore_index=IGNORE)
                loss_g = loss_g + cfg.aux_dice * dice
                out["log/aux_dice"] = dice.detach()
        if cfg.lambda_adv > 0:
            x_prev_fake = self.process.posterior_sample(x0_hat, x_k_att, k, generator)
            adv = F.softplus(-self.disc(x_prev_fake, x_k_att, k - 1)).mean()
            loss_g = loss_g + cfg.lambda_adv * adv
            out["log/g_adv"] = adv.detach()
        out["g"] = loss_g
        out["log/mse"] = mse.detach()
        return out

    # ------------------------------------------------------------------ run folder
    def inference_state_dict(self) -> dict[str, Tensor]:
        """Return the inference generator's weights only (the EMA copy when on; no D, no step counter)."""
        self._sync_ema()
        prefix = "gen_ema." if self.gen_ema is not None else "gen."
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}

    def on_stage_end(self, stage: str, train_batches: Iterable[dict[str, Any]]) -> None:
        """Fold the last optimiser step into the EMA."""
        self._sync_ema()

    # ------------------------------------------------------------------ inference
    def _default_generator(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
        if generator is not None:
            return generator
        return make_generator(self.cfg.seed, device)

    @torch.no_grad()
    def sample(self, images: Tensor, *, n_samples: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw x̂0 samples with T posterior steps from x_T ~ N(0, I) (Algorithm 2, code variant).

        Args:
            images: (B, C, H, W) float32 in [0, 1]; H, W multiples of ``size_divisor``.
            n_samples: chains per image (default ``cfg.n_samples``, or ``cfg.val_n_samples`` during
                `validation_score`); each draws fresh x_T and z.
            generator: generator of every draw (None: a generator seeded with ``cfg.seed``).

        Returns:
            x̂0 samples (S, B, C_y, H, W) in (-1, 1).
        """
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        default = cfg.n_samples if self._chains_override is None else self._chains_override
        n = default if n_samples is None else int(n_samples)
        if n < 1:
            raise InputError(f"cdal: n_samples={n} should be >= 1")
        image = self.preprocess(images)
        b, _, h, w = image.shape
        dev = image.device
        gen = self._default_generator(generator, dev)
        net = self.inference_generator()
        outs = []
        for _ in range(n):
            x = _randn((b, self.label_channels, h, w), gen, dev)
            for k in range(cfg.T, 0, -1):
                kk = torch.full((b,), k, dtype=torch.long, device=dev)
                x0_hat = net(x, kk - 1, self.sample_z(b, gen, dev), image).float()
                x = self.process.posterior_sample(x0_hat, x, kk, gen) if k > 1 else x0_hat
            outs.append(x)
        return torch.stack(outs)

    def _channel_probs(self, samples: Tensor) -> Tensor:
        """Per-channel foreground probability of samples (..., C_y, H, W): clamp((x + 1)/2, 0, 1)."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        x = -samples if cfg.invert_labels else samples
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def _to_class_probs(self, p: Tensor) -> Tensor:
        """Turn per-channel probabilities (B, C_y, H, W) into class probabilities (B, K, H, W)."""
        if self.label_channels == 1:
            return torch.cat([1.0 - p, p], dim=1)
        s = p.sum(1, keepdim=True)
        uniform = torch.full_like(p, 1.0 / p.shape[1])
        return torch.where(s > 1e-6, p / s.clamp_min(1e-6), uniform)

    def _decide(self, p: Tensor) -> Tensor:
        """Class map (B, H, W) from per-channel probabilities (B, C_y, H, W) with ``cfg.decision``."""
        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        if self.label_channels == 1:
            return (p[:, 0] > 0.5).long()  # round(p): 0.5 -> 0, same for both decisions
        if cfg.decision == "mean_round":
            return (p > 0.5).float().argmax(1)  # round each channel, then argmax (all 0 -> class 0)
        return p.argmax(1)

    def _padded(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        from ldiffusion.train.validation import pad_to_multiple

        if images.ndim != 4:
            raise InputError(f"cdal: expected images (B, C, H, W), got {tuple(images.shape)}")
        return pad_to_multiple(images, self.size_divisor)

    def _predict_all(self, images: Tensor, generator: torch.Generator | None,
                     n_samples: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """Return (class probs (B, K, H, W), class map (B, H, W), vote uncertainty (B, H, W))."""
        padded, (h, w) = self._padded(images)
        samples = self.sample(padded, n_samples=n_samples, generator=generator)[..., :h, :w]
        per = self._channel_probs(samples)  # (S, B, C_y, H, W)
        p = per.mean(0)
        final = self._decide(p)
        votes = torch.stack([self._decide(ps) for ps in per])  # (S, B, H, W)
        agree = (votes == final.unsqueeze(0)).float().mean(0)
        return self._to_class_probs(p), final, 1.0 - agree

    @inference_autocast
    def predict_proba(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return class probabilities (B, K, H, W) averaged over ``n_samples`` chains.

        Args:
            images: (B, C, H, W) float32 in [0, 1] (padded internally to ``size_divisor``).
            generator: generator of the sampling noise (None: seeded with ``cfg.seed``).
        """
        return self._predict_all(images, generator, None)[0]

    @inference_autocast
    def predict(self, images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return class maps (B, H, W) int64 with the configured ``decision`` rule."""
        return self._predict_all(images, generator, None)[1]

    @inference_autocast
    def predict_with_uncertainty(self, images: Tensor, *, generator: torch.Generator | None = None,
                                 n_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """Return (probs (B, K, H, W), vote spread (B, H, W) in [0, 1 - 1/S]).

        The spread is 1 - (fraction of samples whose own class map equals the final class map).
        """
        probs, _, unc = self._predict_all(images, generator, n_samples)
        return probs, unc

    def validation_score(self, batches: Iterable[dict[str, Any]], generator: torch.Generator,
                         stage: str) -> float:
        """Mean foreground Dice (dataset level) of `predict` (the configured decision) on validation.

        With ``val_n_samples`` set, every prediction made here averages that many chains.

        With ``input_scale`` < 1 the images go through the resizing sliding window of `predict` instead
        (`Segmenter.validation_score`, the argmax of the probabilities).
        """
        from ldiffusion.train.validation import DiceAccumulator

        cfg = self.cfg
        assert isinstance(cfg, CDALConfig)
        self._chains_override = cfg.val_n_samples
        try:
            if cfg.input_scale != 1.0:
                return super().validation_score(batches, generator, stage)
            acc = DiceAccumulator(self.num_classes)
            with torch.no_grad():
                for batch in batches:
                    pred = self.predict(batch["image"].to(self.device), generator=generator)
                    acc.update(pred, batch["label"].to(pred.device))
            return acc.mean_foreground_dice()
        finally:
            self._chains_override = None
