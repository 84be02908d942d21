"""L-Diffusion: feature stack, stage-1 gradients, ablation switches, save/load and the tiny end-to-end run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ldiffusion.core.errors import ConfigError
from ldiffusion.methods import METHODS, create_method, load_segmenter
from ldiffusion.methods.ldiffusion import LDiffusionConfig, LDiffusionMethod
from ldiffusion.methods.ldiffusion_features import BT601, feature_stack, feature_timesteps, to_grey

if "ldiffusion" not in METHODS:  # until methods/__init__ registers it
    METHODS.register("ldiffusion")(LDiffusionMethod)

K = 5


def _method(**over) -> LDiffusionMethod:
    m = create_method(
        "ldiffusion", preset="tiny", num_classes=K, overrides=[f"{k}={v}" for k, v in over.items()]
    )
    assert isinstance(m, LDiffusionMethod)
    return m


def _batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 64, 64, generator=g)
    y = torch.zeros(b, 64, 64, dtype=torch.long)
    y[:, 16:40, 10:30] = 1
    y[:, 40:60, 35:60] = 2
    y[:, 0:10, 50:64] = 255
    return {
        "image": x,
        "label": y,
        "id": [f"t{i}" for i in range(b)],
        "annotated": torch.ones(b, dtype=torch.bool),
    }


def _stack(m, x, seeds, **kw):
    cfg = m.cfg
    return feature_stack(
        m.ae, m.unet, m.process, x, steps=cfg.steps, t_start=cfg.t_start, eta=cfg.eta, seeds=seeds, **kw
    )


def test_timesteps_and_grey():
    assert feature_timesteps(5, 500, 1000) == [499, 399, 299, 199, 99, -1]
    assert feature_timesteps(3, 50, 100) == [49, 32, 16, -1]
    with pytest.raises(ConfigError, match="repeated"):
        feature_timesteps(10, 5, 100)
    x = torch.rand(1, 3, 4, 4)
    g = BT601[0] * x[:, 0] + BT601[1] * x[:, 1] + BT601[2] * x[:, 2]
    torch.testing.assert_close(to_grey(x)[:, 0], g)


def test_feature_stack_shape_determinism_and_seed_dependence():
    m = _method(steps=4).eval()
    x = _batch(3)["image"]
    f1 = _stack(m, x, [1, 2, 3])
    assert f1.shape == (3, 4, 64, 64)
    assert float(f1.min()) >= 0.0 and float(f1.max()) <= 1.0
    assert torch.equal(f1, _stack(m, x, [1, 2, 3]))  # same seeds -> identical
    f2 = _stack(m, x, [9, 2, 3])
    assert not torch.allclose(f1[0], f2[0])  # another seed -> different
    torch.testing.assert_close(f1[1:], f2[1:])  # ... and only for that tile
    alone = _stack(m, x[2:], [3])  # a tile's features do not depend on its batch
    torch.testing.assert_close(alone[0], f1[2], atol=1e-5, rtol=1e-5)


def test_feature_modes_and_targets_differ():
    m = _method().eval()
    x = _batch(1)["image"]
    base = _stack(m, x, [0])
    for kw in ({"feature_mode": "independent"}, {"decode_target": "x0"}):
        other = _stack(m, x, [0], **kw)
        assert other.shape == base.shape and not torch.allclose(other, base)


@pytest.mark.parametrize("backprop", ["full", "checkpoint", "last_k"])
def test_stage1_gradients_reach_unet_and_decoder(backprop):
    m = _method(crt_backprop=backprop)
    b = _batch(2)
    g = torch.Generator().manual_seed(0)
    out = m.training_step(b, g, "diffusion")
    assert set(out) >= {"unet", "log/mse", "log/crt"} and float(out["log/crt"]) > 0
    # the AE is frozen in stage 1 ...
    assert not any(p.requires_grad for p in m.ae.parameters())
    # ... yet L_CRT alone reaches the U-Net *through* the decoder
    crt = m.contrastive_loss(b["image"], b["label"], torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(crt, list(m.unet.parameters()), allow_unused=True)
    assert any(gr is not None and float(gr.abs().sum()) > 0 for gr in grads)
    # unfrozen decoder parameters would receive gradients from L_CRT too
    m.ae.requires_grad_(True)
    crt = m.contrastive_loss(b["image"], b["label"], torch.Generator().manual_seed(1))
    dec = list(m.ae.decoder.parameters())
    grads = torch.autograd.grad(crt, dec, allow_unused=True)
    assert all(gr is not None for gr in grads) and sum(float(gr.abs().sum()) for gr in grads) > 0


def test_contrastive_off_has_no_crt_and_unannotated_feed_mse_only():
    b = _batch(2)
    off = _method(contrastive=False).training_step(b, torch.Generator().manual_seed(0), "diffusion")
    assert float(off["log/crt"]) == 0.0 and torch.isfinite(off["unet"])
    b["annotated"] = torch.zeros(2, dtype=torch.bool)
    b["label"] = torch.full_like(b["label"], 255)
    un = _method().training_step(b, torch.Generator().manual_seed(0), "diffusion")
    assert float(un["log/crt"]) == 0.0 and float(un["log/mse"]) > 0


ABLATIONS = [
    {"noise": "gaussian"},
    {"noise": "cauchy", "noise_clip": 10.0},
    {"noise": "student_t", "student_nu": 5.0},
    {"noise_scale_convention": "unit_scale"},
    {"contrastive": False},
    {"steps": 2},
    {"steps": 5},
    {"component_schedule": "per_class"},
    {"component_schedule": "per_class", "component_gamma": [1, 1, 1.1, 1.2, 0.9]},
    {"feature_mode": "independent"},
    {"decode_target": "x0"},
    {"eta": 0.0},
    {"feature_draws": 2},
    {"crt_sim": "dot"},
    {"crt_sim": "neg_sq_euclid"},
    {"crt_resolution": 32},
    {"crt_every": 2},
    {"seg_mode": "pixel"},
    {"seg_loss": "dice"},
    {"seg_inputs": "grey+rgb"},
    {"component_schedule": "per_class_iterative", "per_class_iterations": 2},
    {"feature_channels": "grey+rgb", "seg_with_image": True},
    {"seg_head_stride": 1},
    {"feature_norm": "fixed"},
    {"t_train_max": 50, "t_full_share": 0.1, "crt_warmup_steps": 1},
]


@pytest.mark.parametrize("over", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_ablation_switches_construct_and_step(over):
    over = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in over.items()}
    m = _method(**over)
    b = _batch(2)
    for stage in ("diffusion", "segmenter"):
        out = m.training_step(b, torch.Generator().manual_seed(0), stage)
        key = "unet" if stage == "diffusion" else "segmenter"
        assert torch.isfinite(out[key])
        out[key].backward()
    p = m.eval().predict_proba(b["image"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.sum(1), torch.ones(2, 64, 64))


def test_config_errors_and_presets():
    for bad in (
        {"noise": "uniform"},
        {"steps": 0},
        {"t_start": 2, "steps": 3},
        {"ae": "sd_vae"},
        {"crt_backprop": "some"},
    ):
        with pytest.raises(ConfigError):
            LDiffusionConfig.from_dict({**LDiffusionMethod.presets["tiny"], **bad})
    small = LDiffusionConfig.from_dict(dict(LDiffusionMethod.presets["small"]))
    assert (small.steps, small.t_start, small.crt_k, small.train_timesteps) == (5, 200, 32, 1000)
    assert (
        LDiffusionMethod.presets["paper"]["steps"] == 10 and LDiffusionMethod.presets["paper"]["crt_k"] == 100
    )
    stages = [s.name for s in _method().stages()]
    assert stages == ["autoencoder", "diffusion", "segmenter"]


def test_predict_uncertainty_save_load_round_trip(tmp_path):
    m = _method(n_samples=2).eval()
    x = _batch(2)["image"]
    p1 = m.predict_proba(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(p1, m.predict_proba(x, generator=torch.Generator().manual_seed(3)))
    _, unc = m.predict_with_uncertainty(x, generator=torch.Generator().manual_seed(3), n_samples=3)
    assert (
        unc.shape == (2, 64, 64) and float(unc.min()) >= 0 and float(unc.max()) <= 1 and float(unc.max()) > 0
    )
    m.save(tmp_path / "run")
    m2 = load_segmenter(tmp_path / "run")
    assert isinstance(m2, LDiffusionMethod) and m2.cfg == m.cfg
    assert torch.equal(m2.predict_proba(x, generator=torch.Generator().manual_seed(3)), p1)


def test_reuses_trained_autoencoder_run(tmp_path):
    ae = create_method("autoencoder", preset="tiny", num_classes=K)
    ae.ae.scaling_factor = 2.5
    ae.save(tmp_path / "ae")
    m = _method(autoencoder=str(tmp_path / "ae"))
    assert [s.name for s in m.stages()] == ["diffusion", "segmenter"]
    assert m.ae.scaling_factor == pytest.approx(2.5)
    pairs = zip(m.ae.state_dict().values(), ae.ae.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_pretrained_autoencoder_gets_class_gammas_before_the_diffusion_stage(tmp_path):
    from ldiffusion.diffusion.schedules import gammas_from_frequencies

    ae = create_method("autoencoder", preset="tiny", num_classes=K)
    ae.ae.scaling_factor = 2.5
    ae.save(tmp_path / "ae")
    m = _method(autoencoder=str(tmp_path / "ae"), component_schedule="per_class")
    before = m.component_gammas.clone()
    b = _batch(2)  # pixel counts: background most frequent, then class 1, class 2; 3 and 4 absent
    m.on_stage_start("diffusion", [b])
    counts = torch.bincount(b["label"][b["label"] < K].flatten(), minlength=K).double()
    expected = torch.tensor(gammas_from_frequencies(counts.tolist()), dtype=torch.float64)
    assert torch.equal(m.component_gammas, expected) and not torch.equal(before, expected)
    assert m.ae.scaling_factor == pytest.approx(2.5)  # the pretrained autoencoder keeps its scale
    m.on_stage_start("segmenter", [_batch(2, seed=1)])  # other stages leave γ alone
    assert torch.equal(m.component_gammas, expected)


def test_feature_cache(tmp_path):
    m = _method(feature_cache=str(tmp_path / "cache"))
    b = _batch(2)
    m.training_step(b, torch.Generator().manual_seed(0), "segmenter")
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 2
    f = torch.load(files[0], weights_only=True)
    assert f.shape == (3, 64, 64)


@pytest.mark.e2e
def test_tiny_end_to_end_reaches_foreground_dice(synth_root, tmp_path):
    """Tiny preset through `fit` on the synthetic set: test foreground Dice well above predict-
    background (0).
    """

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 threads on a shared 2-core machine
    try:
        _run_e2e(synth_root, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run_e2e(synth_root, tmp_path):
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.train.loop import fit
    from ldiffusion.train.validation import DiceAccumulator

    t0 = time.monotonic()
    m = _method()
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=64), seed=0)
    val = SegmentationDataset(synth_root, "val")
    res = fit(m, train, val, tmp_path / "run", progress=False)
    assert res.finished
    test = SegmentationDataset(synth_root, "test")
    acc, bg = DiceAccumulator(K), DiceAccumulator(K)
    for i in range(len(test)):
        s = test[i]
        pred = m.predict(s["image"][None], generator=torch.Generator().manual_seed(i))
        acc.update(pred, s["label"][None])
        bg.update(torch.zeros_like(pred), s["label"][None])
    dice = acc.mean_foreground_dice()
    assert bg.mean_foreground_dice() == 0.0
    assert dice >= E2E_DICE_BAR, f"foreground Dice {dice:.3f} (per class {acc.dice()})"
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs if r["type"] == "stage_end"} == {"autoencoder", "diffusion", "segmenter"}
    assert time.monotonic() - t0 < 300


#: measured: test foreground Dice 0.61 (stroma 0.92, nucleus 0.80, gland 0.12; necrosis absent from the test
#: split) after a 40-160 s fit on one thread; predict-background scores 0. The bar sits below the measurement.
E2E_DICE_BAR = 0.45
