"""L-Diffusion options of issue 19: per-class (iterative) schedules, training timesteps, L_CRT warm-up,
trajectory channels, the full-resolution head, context-independent normalisation, key validation, resume.
"""

from __future__ import annotations

import pytest
import torch

from ldiffusion.core.errors import ConfigError
from ldiffusion.diffusion.noise import NoiseDistribution
from ldiffusion.diffusion.schedules import reduce_labels_majority
from ldiffusion.methods import create_method
from ldiffusion.methods.ldiffusion import LDiffusionConfig, LDiffusionMethod
from ldiffusion.methods.ldiffusion_norm import CalibratedGroupNorm, WindowedSelfAttention2d

K = 5
GAMMAS = "[0.8,0.9,1.0,1.1,1.2]"


def _method(**over) -> LDiffusionMethod:
    m = create_method(
        "ldiffusion", preset="tiny", num_classes=K, overrides=[f"{k}={v}" for k, v in over.items()]
    )
    assert isinstance(m, LDiffusionMethod)
    return m


def _batch(b=2, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    y = torch.zeros(b, size, size, dtype=torch.long)
    y[:, 16:40, 8:32] = 1
    y[:, 40:60, 36:60] = 2
    y[:, 0:8, 48:64] = 255
    return {
        "image": x,
        "label": y,
        "id": [f"t{i}" for i in range(b)],
        "annotated": torch.ones(b, dtype=torch.bool),
    }


# ---------------------------------------------------------------------- per-class schedules at training
@pytest.mark.parametrize("mode", ["per_class", "per_class_iterative"])
def test_per_class_schedules_give_each_class_its_own_abar_at_training(mode):
    m = _method(component_schedule=mode, component_gamma=GAMMAS, t_train_max=100)
    b = _batch(3)
    f = int(m.ae.downsample_factor)
    z0 = torch.zeros(3, 4, 64 // f, 64 // f)
    xt, eps, t = m.noised_latents(z0, b["label"], torch.Generator().manual_seed(0))
    abar = 1.0 - (xt / eps).double() ** 2  # z0 = 0: x_t = sqrt(1 - abar) * eps
    comp = reduce_labels_majority(b["label"], f, K)
    table = m._component_schedule().table
    for i in range(3):
        for n in (0, 1, 2):
            cells = comp[i] == n
            assert bool(cells.any())
            want = float(table[n, t[i]])
            torch.testing.assert_close(
                abar[i][:, cells], torch.full_like(abar[i][:, cells], want), atol=1e-5, rtol=0
            )
        ignored = comp[i] == 255  # unlabelled cells follow the base schedule (row N)
        torch.testing.assert_close(
            abar[i][:, ignored],
            torch.full_like(abar[i][:, ignored], float(table[K, t[i]])),
            atol=1e-5,
            rtol=0,
        )
    # the classes differ (γ 0.8 / 0.9 / 1.0), so their ᾱ at the same t differ
    assert len({round(float(table[n, int(t[0])]), 6) for n in (0, 1, 2)}) == 3
    shared = _method(component_gamma=GAMMAS, t_train_max=100)
    xs, es, _ = shared.noised_latents(z0, b["label"], torch.Generator().manual_seed(0))
    ab_s = 1.0 - (xs / es).double() ** 2
    assert float(ab_s[0].max() - ab_s[0].min()) < 1e-5  # one schedule everywhere


# ---------------------------------------------------------------------- training timesteps and L_CRT weight
def test_training_timesteps_follow_t_train_max_and_full_share():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    default = _method(t_train_max=None)
    assert default.cfg.t_train_high == default.cfg.t_start == 20
    t = default.training_timesteps(4000, g(), torch.device("cpu"))
    assert int(t.min()) == 0 and int(t.max()) == 19  # U{1..t_start}, 0-based
    full = _method()  # tiny preset: t_train_max = T_train = 100, the paper's U{1..T_train}
    from ldiffusion.diffusion.timesteps import training_timesteps

    assert torch.equal(
        full.training_timesteps(64, g(), torch.device("cpu")), training_timesteps(64, 100, g())
    )
    mixed = _method(t_train_max=30, t_full_share=0.25)
    t = mixed.training_timesteps(8000, g(), torch.device("cpu"))
    above = float((t >= 30).float().mean())  # share * 70/100 of the draws land above 30
    assert abs(above - 0.25 * 0.7) < 0.02 and int(t.max()) > 90


def test_crt_warmup_then_linear_ramp():
    cfg = LDiffusionConfig.from_dict(
        {**LDiffusionMethod.presets["tiny"], "crt_warmup_steps": 2, "crt_ramp_steps": 4}
    )
    assert [cfg.crt_weight_at(s) for s in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    step = LDiffusionConfig.from_dict(
        {**LDiffusionMethod.presets["tiny"], "crt_warmup_steps": 1, "crt_ramp_steps": 0}
    )
    assert [step.crt_weight_at(s) for s in range(3)] == [0.0, 1.0, 1.0]
    m = _method(crt_warmup_steps=2, crt_ramp_steps=2)
    b = _batch(2)
    logs = [m.training_step(b, torch.Generator().manual_seed(s), "diffusion") for s in range(3)]
    assert [float(x["log/crt_weight"]) for x in logs] == [0.0, 0.0, 0.5]
    assert float(logs[0]["log/crt"]) == 0.0 and float(logs[2]["log/crt"]) > 0  # not computed while 0


# ---------------------------------------------------------------------- iterative inference
def test_iterative_inference_reruns_with_predicted_maps_and_uses_no_label():
    m = _method(
        component_schedule="per_class_iterative", per_class_iterations=2, component_gamma=GAMMAS
    ).eval()
    b = _batch(2)
    calls = []
    orig = m.features

    def spy(images, seeds, component_map=None, **kw):
        calls.append(component_map)
        return orig(images, seeds, component_map, **kw)

    m.features = spy
    p = m.predict_proba(b["image"], generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3 and calls[0] is None and all(c is not None for c in calls[1:])
    # pass 1 runs the classes predicted by pass 0: recompute pass 0 by hand
    seeds = m._draw_seeds(torch.Generator().manual_seed(0), 2)
    logits0 = m.segment(orig(b["image"], seeds), b["image"])
    assert torch.equal(calls[1], m.component_map_of(logits0))
    # the re-runs change the output (the class schedules differ) ...
    once = _method(component_schedule="per_class", component_gamma=GAMMAS).eval()
    once.load_state_dict(m.state_dict())
    assert not torch.allclose(once.predict_proba(b["image"], generator=torch.Generator().manual_seed(0)), p)
    # ... and validation (which sees batches with labels) predicts the same with poisoned labels
    m.features = orig
    seen = []
    pp = m.predict_proba
    m.predict_proba = lambda x, **kw: seen.append(pp(x, **kw)) or seen[-1]
    poisoned = dict(
        b, label=torch.randint(0, K, b["label"].shape, generator=torch.Generator().manual_seed(9))
    )
    m.validation_score([b], torch.Generator().manual_seed(0), "segmenter")
    m.validation_score([poisoned], torch.Generator().manual_seed(0), "segmenter")
    half = len(seen) // 2  # one call per validation tile
    assert half >= 1 and all(torch.equal(a, c) for a, c in zip(seen[:half], seen[half:], strict=True))


def test_stage2_share_uses_training_labels_only_for_the_chosen_tiles():
    m = _method(component_schedule="per_class_iterative", per_class_seg_share=1.0, component_gamma=GAMMAS)
    got = []
    orig = m._train_features
    m._train_features = lambda im, ids, comp=None: got.append(comp) or orig(im, ids, comp)
    b = _batch(2)
    m.training_step(b, torch.Generator().manual_seed(0), "segmenter")
    f = int(m.ae.downsample_factor)
    assert torch.equal(got[0], reduce_labels_majority(b["label"], f, K))
    m0 = _method(component_schedule="per_class_iterative", per_class_seg_share=0.0)
    got.clear()
    o0 = m0._train_features
    m0._train_features = lambda im, ids, comp=None: got.append(comp) or o0(im, ids, comp)
    m0.training_step(b, torch.Generator().manual_seed(0), "segmenter")
    assert got == [None]


# ---------------------------------------------------------------------- trajectories and head
@pytest.mark.parametrize(("channels", "m_per_step"), [("grey", 1), ("rgb", 3), ("grey+rgb", 4)])
def test_feature_channels_and_segmenter_input(channels, m_per_step):
    m = _method(feature_channels=channels, seg_with_image=True).eval()
    x = _batch(1)["image"]
    f = m.features(x, [0])
    assert f.shape == (1, 3 * m_per_step, 64, 64)
    assert m.seg.in_chans == 3 * m_per_step + 3
    if channels == "grey+rgb":  # grey first, then the colour maps of the same decoded step
        from ldiffusion.methods.ldiffusion_features import to_grey

        torch.testing.assert_close(f[:, :1], to_grey(f[:, 1:4]))


def test_without_the_trajectory_the_segmenter_sees_only_the_image():
    m = _method(seg_with_image=True, seg_trajectory=False).eval()
    x = _batch(1)["image"]
    f = m.features(x, [0])
    assert f.shape == (1, 3, 64, 64) and not f.any()  # zeros of the stack's shape, no chain run
    with torch.no_grad():  # so the noise draw cannot change the output
        a = m.predict_proba(x, generator=torch.Generator().manual_seed(0))
        b = m.predict_proba(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    with_chain = _method(seg_with_image=True).eval()
    assert with_chain.features(x, [0]).any()  # the control differs from the method
    with pytest.raises(ConfigError, match="seg_trajectory"):
        _method(seg_trajectory=False)  # no image and no stack: nothing to segment


def test_seg_head_stride_adds_full_resolution_stages():
    assert len(_method().seg.decoder.up) == 0 and _method().seg.head_stride == 2  # tiny stem stride 2
    m = _method(seg_head_stride=1)
    assert m.seg.head_stride == 1 and len(m.seg.decoder.up) == 1
    x = torch.rand(1, 3, 64, 64)
    assert m.seg(x).shape == (1, K, 64, 64)
    # a one-pixel change of the input moves the stride-1 logits at that pixel
    x2 = x.clone()
    x2[0, :, 33, 33] += 1.0
    with torch.no_grad():
        d = (m.seg(x2) - m.seg(x)).abs()[0].sum(0)
    assert float(d[33, 33]) > 0
    with pytest.raises(ConfigError, match="seg_head_stride"):
        _method(seg_head_stride=4)  # coarser than the tiny stem stride (2)


# ---------------------------------------------------------------------- context-independent features
class _ZeroNoise(NoiseDistribution):
    """No noise, so that a tile and the larger image share every draw (only normalisation differs)."""

    name = "zero"

    @property
    def variance(self) -> float:
        return 1.0

    def _sample(self, shape, generator, device, dtype):
        return torch.zeros(shape, device=device, dtype=dtype)


def _perturbed(**over) -> LDiffusionMethod:
    """Tiny method with random GroupNorm affine weights, so that normalisation shapes every feature.

    The other weights keep their initialisation (residual branches start at zero), which keeps the
    receptive field small: the centre of a 64 px tile sees no zero padding, so only normalisation can
    make a tile differ from the same pixels inside a larger image.
    """
    m = _method(**over).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in [*m.ae.modules(), *m.unet.modules()]:
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.mul_(0.5 + 1.5 * torch.rand(mod.weight.shape, generator=g))
                mod.bias.add_(0.5 * torch.randn(mod.bias.shape, generator=g))
    m.process.noise = _ZeroNoise()
    return m


def test_feature_stack_of_a_tile_equals_the_same_pixels_inside_a_larger_image():
    g = torch.Generator().manual_seed(1)
    big = torch.ones(1, 3, 128, 128)  # white glass around ...
    big[:, :, 64:, 64:] = 0.3 + 0.4 * torch.rand(1, 3, 64, 64, generator=g)  # ... one tissue tile
    tile = big[:, :, 64:, 64:]
    centre = (slice(None), slice(None), slice(24, 40), slice(24, 40))

    def gap(m):
        ft = m.features(tile, [0])
        fb = m.features(big, [0])[:, :, 64:, 64:]
        return float((ft[centre] - fb[centre]).abs().max()), float(ft.std())

    fixed = _perturbed(feature_norm="fixed")
    assert any(isinstance(x, CalibratedGroupNorm) for x in fixed.unet.modules())
    crops = [{"image": 0.3 + 0.4 * torch.rand(2, 3, 64, 64, generator=g)} for _ in range(2)]
    assert fixed.calibrate_feature_norms(crops, 2) == 4 and bool(fixed.norm_calibrated)
    per_tile = _perturbed()  # the same weights, statistics of the tile (the paper's networks)
    (g_fixed, _), (g_tile, spread) = gap(fixed), gap(per_tile)
    assert g_fixed < 2e-3, f"fixed statistics: tile vs larger image differ by {g_fixed:.5f}"
    assert g_tile > 10 * g_fixed and g_tile > 0.3 * spread, (g_tile, g_fixed, spread)


def test_windowed_attention_attends_within_training_crop_windows():
    from ldiffusion.nets.blocks import SelfAttention2d

    att = SelfAttention2d(8)
    torch.nn.init.normal_(att.proj.weight)
    ref = SelfAttention2d(8)
    ref.load_state_dict(att.state_dict())
    att.__class__ = WindowedSelfAttention2d
    x = torch.randn(1, 8, 8, 12)
    torch.testing.assert_close(att(x), ref(x))  # not windowed: the original layer
    att.windowed, att.window = True, (4, 4)
    y = att(x)
    torch.testing.assert_close(y[..., 4:8, 8:12], ref(x[..., 4:8, 8:12]))  # one window = its own tile
    assert not torch.allclose(y, ref(x))


def test_calibrated_group_norm_modes():
    gn = torch.nn.GroupNorm(2, 4, eps=1e-6)
    torch.nn.init.normal_(gn.weight)
    cal = CalibratedGroupNorm.from_group_norm(gn, slots=2)
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    torch.testing.assert_close(cal(x), gn(x))  # "tile" = nn.GroupNorm
    cal.mode, cal.slot = "calibrate", 1
    torch.testing.assert_close(cal(x), gn(x))
    cal.finish()
    xg = x.reshape(3, 2, -1)
    torch.testing.assert_close(cal.slot_mean[1], xg.mean(-1).mean(0))
    torch.testing.assert_close(cal.slot_var[1], xg.var(-1, unbiased=False).mean(0))
    assert float(cal.slot_count[0]) == 0 and float(cal.slot_count[1]) == 3
    cal.mode = "fixed"
    one = cal(x[:1])
    # per pixel: a pixel's output no longer depends on the rest of the tile
    x2 = x[:1].clone()
    x2[..., 0, 0] += 10
    torch.testing.assert_close(cal(x2)[..., 1:, :], one[..., 1:, :])
    assert not torch.allclose(gn(x2)[..., 1:, :], gn(x[:1])[..., 1:, :])


# ---------------------------------------------------------------------- validation of the new keys
BAD = [
    ("component_schedule", "iterative"),
    ("per_class_iterations", 0),
    ("per_class_seg_share", 1.5),
    ("t_train_max", 10),  # below t_start = 20
    ("t_train_max", 101),  # above T_train = 100
    ("t_full_share", -0.1),
    ("crt_warmup_steps", -1),
    ("crt_ramp_steps", -2),
    ("feature_channels", "lab"),
    ("feature_norm", "batch"),
    ("norm_calibration_batches", 0),
    ("seg_head_stride", 3),
    ("seg_with_image", "sometimes"),
]


@pytest.mark.parametrize(("key", "value"), BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_new_keys_reject_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        LDiffusionConfig.from_dict({**LDiffusionMethod.presets["tiny"], key: value})


def test_presets_keep_the_old_training_range_and_small_takes_the_kept_switches():
    for name, t_max in (("tiny", 100), ("small", 1000), ("paper", 1000)):
        assert LDiffusionMethod.presets[name]["t_train_max"] == t_max
    small = LDiffusionConfig.from_dict(dict(LDiffusionMethod.presets["small"]))
    assert (small.component_schedule, small.feature_channels, small.feature_norm) == (
        "shared",
        "grey",
        "tile",
    )
    # the two switches the ablation kept (docs/results.md, tenth run); paper keeps the paper's reading
    assert (small.seg_with_image, small.seg_head_stride, small.crop_px, small.crt_warmup_steps) == (
        True,
        1,
        128,
        0,
    )
    paper = {**LDiffusionMethod.presets["paper"], "ae": "small"}  # the paper's SD VAE needs a folder
    paper_cfg = LDiffusionConfig.from_dict(paper)
    kept = (paper_cfg.seg_with_image, paper_cfg.seg_head_stride, paper_cfg.feature_channels)
    assert kept == (False, None, "grey")


# ---------------------------------------------------------------------- exact resume with the new options
@pytest.mark.parametrize("stop", [3, 5])
def test_resume_across_stages_with_new_options(stop, synth_root, tmp_path):
    """Stop inside stage 1 (before the calibration) or inside stage 2; the resumed run equals the full run."""
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.train.loop import fit

    over = [
        "ae_steps=2", "diffusion_steps=2", "seg_steps=2", "val_every=0", "ckpt_every=1", "batch_size=2",
        "ae_batch_size=2", "crt_resolution=32", "crop_px=32", "component_schedule=per_class_iterative",
        "feature_norm=fixed", "norm_calibration_batches=2", "crt_warmup_steps=1", "t_train_max=50",
        "t_full_share=0.5", "feature_channels=grey+rgb", "seg_with_image=true", "seg_head_stride=1",
    ]  # fmt: skip
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=32), seed=0)
    val = SegmentationDataset(synth_root, "val")

    def make():
        return create_method("ldiffusion", preset="tiny", num_classes=5, overrides=over)

    full = make()
    assert fit(full, train, val, tmp_path / "full", generator_seed=3, progress=False).finished
    assert bool(full.norm_calibrated)
    part = make()
    r = fit(part, train, val, tmp_path / "part", generator_seed=3, progress=False, max_steps=stop)
    assert not r.finished and r.steps_run == stop
    resumed = make()
    r2 = fit(resumed, train, val, tmp_path / "part", generator_seed=3, progress=False, resume=True)
    assert r2.finished and r2.steps_run == 6 - stop
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ after resume, e.g. {differing[:3]}"
