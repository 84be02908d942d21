"""LDSeg method: schedule, DDIM grid/step, losses, per-sample noise, batch independence, uncertainty."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.diffusion.schedules import cosine_alphas_cumprod
from ldiffusion.methods.ldseg import (
    LDSegConfig,
    LDSegSegmenter,
    cosine_alpha_bar,
    ddim_grid,
    ddim_update,
    from_v,
    ldseg_dice,
    renormalize,
    v_target,
)

K = 3


def make(**over) -> LDSegSegmenter:
    d = {**LDSegSegmenter.presets["tiny"], "preset": "tiny", **over}
    torch.manual_seed(0)
    return LDSegSegmenter(LDSegConfig.from_dict(d), num_classes=K)


def unzero(m: torch.nn.Module) -> None:
    """Give zero-initialised tensors small random values so every path carries signal and gradient."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def batch(b=4, size=64):
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(b, size, size, dtype=torch.long)
    y[:, 8:40, 8:40] = 1
    y[:, 40:, 30:] = 2
    y[1] = y[1].flip(-1)
    return {"image": torch.rand(b, 3, size, size, generator=g), "label": y}


# ----------------------------------------------------------------------------- pure functions
def test_alpha_bar_values():
    ab = cosine_alpha_bar(torch.arange(1000))
    assert float(ab[0]) == 1.0
    assert float(ab[499]) == pytest.approx(0.4954, abs=1e-4)
    assert float(ab[999]) == pytest.approx(2.43e-6, rel=1e-2)
    assert torch.allclose(ab, cosine_alphas_cumprod(1000), rtol=0, atol=1e-12)
    assert bool((ab[1:] < ab[:-1]).all())
    m = make()
    assert torch.allclose(m.alphas_cumprod, ab)


def test_ddim_grid():
    assert ddim_grid(1000, 2).tolist() == [999.0, 0.0]
    g10 = ddim_grid(1000, 10)
    assert g10[0] == 999 and g10[-1] == 0 and len(g10) == 10 and bool((g10 == g10.round()).all())
    assert ddim_grid(1000, 1000).tolist() == list(range(999, -1, -1))
    assert not bool((ddim_grid(1000, 7, round_grid=False) == ddim_grid(1000, 7)).all())
    with pytest.raises(ConfigError, match=">= 2"):
        ddim_grid(1000, 1)
    with pytest.raises(ConfigError):
        LDSegConfig(ddim_steps=1)


def test_tau_zero_step_is_identity_for_k2():
    z, eps_hat = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    grid = ddim_grid(1000, 2).tolist()
    ab0 = float(cosine_alpha_bar(torch.tensor(grid[-1])))
    assert ab0 == 1.0
    assert torch.equal(ddim_update(z, eps_hat, ab0, 1.0), z)
    assert torch.equal(ddim_update(z, eps_hat, ab0, 1.0, eta=1.0, noise=torch.randn_like(z)), z)
    # the one effective step of K = 2: x0 at tau = 999
    ab = float(cosine_alpha_bar(torch.tensor(999.0)))
    out = ddim_update(z, eps_hat, ab, ab0)
    assert torch.allclose(out, (z - (1 - ab) ** 0.5 * eps_hat) / ab**0.5)


def test_code_global_dice_is_mean_true_class_probability():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 8, 8, generator=g), 1)
    y = torch.randint(0, 4, (2, 8, 8), generator=g)
    dice = ldseg_dice(probs, y, "code_global")
    p_true = probs.gather(1, y[:, None]).mean()
    assert float(1 - dice) == pytest.approx(float(1 - p_true), abs=1e-6)


def test_mean_fg_dice():
    y = torch.tensor([[[0, 1], [2, 2]]])
    onehot = torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float()
    assert float(ldseg_dice(onehot, y)) == pytest.approx(1.0, abs=1e-5)  # class 3 absent: not counted
    y_ign = y.clone()
    y_ign[0, 0, 1] = 255
    assert float(ldseg_dice(onehot, y_ign)) == pytest.approx(1.0, abs=1e-5)
    assert float(ldseg_dice(torch.full((1, 4, 2, 2), 0.25), y)) < 0.5


def test_renormalize_modes():
    z = torch.randn(3, 1, 4, 4) * 5 + 2
    s = renormalize(z, "sample")
    assert torch.allclose(s.mean((1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.std((1, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(renormalize(z, "batch").mean(), torch.tensor(0.0), atol=1e-5)
    assert torch.equal(renormalize(z, "none"), z)


# ----------------------------------------------------------------------------- training
def test_training_shapes_and_per_sample_noise():
    m = make()
    b = batch()
    out = m.forward_train(b["image"], b["label"], torch.Generator().manual_seed(0))
    for k in ("z0", "zi", "eps", "zt", "eps_hat", "zdn"):
        assert out[k].shape == (4, 1, 4, 4), k
    assert out["logits"].shape == (4, K, 64, 64) and out["t"].shape == (4,)
    eps = out["eps"].flatten(1)
    assert all(not torch.allclose(eps[i], eps[j]) for i in range(4) for j in range(i + 1, 4))
    assert len(set(out["t"].tolist())) > 1
    z0 = out["z0"]
    assert torch.allclose(z0.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z0.std((1, 2, 3), unbiased=False), torch.ones(4), atol=1e-2)
    shared = make(shared_noise=True, t_per_batch=True).forward_train(
        b["image"], b["label"], torch.Generator().manual_seed(0))
    assert torch.equal(shared["eps"][0], shared["eps"][3]) and len(set(shared["t"].tolist())) == 1


def test_every_parameter_of_the_four_modules_gets_a_gradient():
    m = make(latent_affine=True)
    unzero(m)
    out = m.training_step(batch(), torch.Generator().manual_seed(0), "main")
    out["model"].backward()
    for mod in ("label_encoder", "image_encoder", "denoiser", "decoder"):
        for n, p in getattr(m, mod).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{mod}.{n}"
    assert set(out) == {"model", "log/ce", "log/dice", "log/mse"}
    assert [list(s.optimizers) for s in m.stages()] == [["model"]]


@pytest.mark.parametrize("over", [{}, {"zdn_mode": "x0", "dice_mode": "code_global", "label_input": "index"},
                                  {"prediction": "v"}])
def test_same_seed_same_loss_and_sample(over):
    losses, samples = [], []
    for _ in range(2):
        m = make(**over)
        loss = m.training_step(batch(), torch.Generator().manual_seed(5), "main")["model"]
        losses.append(float(loss.detach()))
        m.eval()
        samples.append(m.predict_proba(batch(2)["image"], generator=torch.Generator().manual_seed(7)))
    assert losses[0] == losses[1] and torch.isfinite(torch.tensor(losses)).all()
    assert torch.equal(samples[0], samples[1])


def test_ema_tracks_the_denoiser_and_is_saved(tmp_path):
    m = make(ema=0.5)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-2)
    ema0 = [p.clone() for p in m.denoiser_ema.parameters()]
    m.training_step(batch(), torch.Generator().manual_seed(0), "main")["model"].backward()
    opt.step()
    assert int(m.ema_pending) == 1
    den = m.inference_denoiser()
    assert den is m.denoiser_ema and int(m.ema_pending) == 0
    for pe, p0, p in zip(m.denoiser_ema.parameters(), ema0, m.denoiser.parameters(), strict=True):
        assert torch.allclose(pe, 0.5 * p0 + 0.5 * p.detach())
    keys = set(m.inference_state_dict())
    assert any(k.startswith("denoiser_ema.") for k in keys)
    assert not any(k.startswith(("label_encoder.", "denoiser.")) for k in keys)
    m.eval()
    m.save(tmp_path)
    m2 = make(ema=0.5)
    from ldiffusion.core.io import load_weights

    m2.load_inference_state_dict(load_weights(tmp_path / "model.safetensors"))
    m2.eval()
    x = batch(2)["image"]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(m.predict_proba(x, generator=g()), m2.predict_proba(x, generator=g()))


def test_whole_model_ema_averages_encoder_decoder_and_statistics_with_warm_up(tmp_path):
    m = make(ema=0.9, ema_scope="all", image_downsampler="resnet18", latent_stride=8, decoder_skips=True)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-2)
    pairs = [(m.image_encoder_ema, m.image_encoder), (m.decoder_ema, m.decoder), (m.denoiser_ema, m.denoiser)]
    before = [[t.clone() for t in e.state_dict().values()] for e, _ in pairs]
    m.training_step(batch(), torch.Generator().manual_seed(0), "main")["model"].backward()
    opt.step()
    assert m.ema_decay() == pytest.approx(0.1)  # min(0.9, (1 + 0) / (10 + 0))
    m._sync_ema()
    assert int(m.ema_updates) == 1 and m.ema_decay() == pytest.approx(2 / 11)
    for (ema, live), old in zip(pairs, before, strict=True):
        for (key, e), o, (_, v) in zip(ema.state_dict().items(), old, live.state_dict().items(), strict=True):
            want = 0.1 * o + 0.9 * v if e.is_floating_point() else v
            assert torch.allclose(e, want, atol=1e-6), key
    assert any("running_mean" in k for k in m.image_encoder_ema.state_dict())
    keys = set(m.inference_state_dict())
    assert {k.split(".")[0] for k in keys} == {"image_encoder_ema", "decoder_ema", "denoiser_ema"}
    m.eval()
    x = batch(2)["image"]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    p0 = m.predict_proba(x, generator=g())
    with torch.no_grad():  # the live weights do not predict ...
        for p in (*m.image_encoder.parameters(), *m.decoder.parameters()):
            p.add_(1.0)
    assert torch.equal(m.predict_proba(x, generator=g()), p0)
    m.save(tmp_path)  # ... and the saved averages reproduce the prediction
    m2 = make(ema=0.9, ema_scope="all", image_downsampler="resnet18", latent_stride=8, decoder_skips=True)
    from ldiffusion.core.io import load_weights

    m2.load_inference_state_dict(load_weights(tmp_path / "model.safetensors"))
    m2.eval()
    assert torch.equal(m2.predict_proba(x, generator=g()), p0)
    assert make(ema=0.9).image_encoder_ema is None and "ema_updates" not in make(ema=0.9).state_dict()


def test_config_checks():
    with pytest.raises(ConfigError, match="divisible by 64"):
        LDSegConfig(crop_px=96)
    with pytest.raises(ConfigError):
        LDSegConfig.from_dict({"renorm": "global"})
    with pytest.raises(ConfigError):
        LDSegConfig(ema=1.0)


# ----------------------------------------------------------------------------- inference
def test_prediction_does_not_depend_on_the_other_images_in_the_batch():
    m = make()
    unzero(m)
    m.eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    zi = m.image_encoder(m.preprocess(x))
    seeds = [11, 12, 13]
    alone = m.sample_logits(zi[:1], seeds[:1])
    together = m.sample_logits(zi, seeds)
    assert torch.allclose(alone, together[:1], atol=1e-5)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    p1, p3 = m.predict_proba(x[:1], generator=g()), m.predict_proba(x, generator=g())
    assert torch.equal(p1, p3[:1])
    # the code's whole-batch renormalisation couples the images
    mb = make(renorm="batch")
    mb.load_state_dict(m.state_dict())
    mb.eval()
    assert not torch.allclose(mb.sample_logits(zi[:1], seeds[:1]), mb.sample_logits(zi, seeds)[:1], atol=1e-5)


@pytest.mark.parametrize("over", [{"ddim_steps": 2}, {"ddim_steps": 10}, {"ddim_steps": 10, "eta": 1.0},
                                  {"ddim_steps": 5, "round_grid": False, "call_at_zero": True},
                                  {"renorm": "none"}, {"prediction": "v"},
                                  {"prediction": "v", "ddim_steps": 10, "eta": 1.0}])
def test_ddim_runs_and_uncertainty(over):
    m = make(**over)
    unzero(m)
    m.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    probs = m.predict_proba(x, generator=g())
    assert probs.shape == (2, K, 64, 64) and torch.allclose(probs.sum(1), torch.ones(2, 64, 64))
    mean1, unc1 = m.predict_with_uncertainty(x, generator=g(), n_samples=1)
    assert torch.equal(unc1, torch.zeros(2, 64, 64)) and torch.equal(mean1, probs)
    mean, unc = m.predict_with_uncertainty(x, generator=g(), n_samples=3)
    assert unc.shape == (2, 64, 64) and bool((unc >= 0).all()) and float(unc.max()) <= 0.5 + 1e-6
    assert torch.allclose(mean.sum(1), torch.ones(2, 64, 64))
    assert set(torch.unique(mean * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_uncertainty_sd_is_positive_where_runs_disagree():
    m = make(sample_chunk=2)
    unzero(m)
    m.eval()

    class StubDecoder(torch.nn.Module):  # class map = sign pattern of the latent: runs disagree
        def forward(self, z, skips=None):
            up = z.repeat_interleave(16, -1).repeat_interleave(16, -2)
            return torch.cat([up, -up, torch.zeros_like(up)], 1)

    m.decoder = StubDecoder()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean, unc = m.predict_with_uncertainty(x, generator=torch.Generator().manual_seed(0), n_samples=6)
    disagree = mean.amax(1) < 1
    assert bool(disagree.any())
    assert bool((unc[disagree] > 0).all()) and bool((unc[~disagree] == 0).all())
    fg = mean[:, 1:]
    assert torch.allclose(unc, (fg * (1 - fg)).sqrt().amax(1))
    _, ent = make(uncertainty="entropy").eval().predict_with_uncertainty(x, n_samples=2)
    assert bool((ent >= 0).all()) and bool((ent <= 1 + 1e-6).all())


# ----------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_tiny_run_on_synthetic_data_beats_background(synth_root, tmp_path):
    """100 steps of the tiny preset (decoder BN off, lr 3e-3), 2-step DDIM.

    Reference points on this split (5 classes, latent 4x4): all-background 0.0; all-stroma (majority
    class) 0.25; the 16x16-block majority oracle (best a 4x4 latent can do with blocks) 0.33.
    """
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.train.loop import fit
    from ldiffusion.train.validation import DiceAccumulator

    m = LDSegSegmenter(LDSegConfig.from_dict({**LDSegSegmenter.presets["tiny"], "steps": 100, "val_every": 50,
                                              "lr": 3e-3, "decoder_bn": False}), num_classes=5)
    t0 = time.monotonic()
    aug = TrainTransform(crop_px=64, rot90=False)
    train = SegmentationDataset(synth_root, "train", transform=aug, seed=0)
    res = fit(m, train, SegmentationDataset(synth_root, "val"), tmp_path / "run", progress=False)
    test = SegmentationDataset(synth_root, "test")
    acc = DiceAccumulator(5)
    with torch.no_grad():
        for i in range(len(test)):
            item = test[i]
            p = m.predict_proba(item["image"][None], generator=torch.Generator().manual_seed(0))
            acc.update(p.argmax(1), item["label"][None])
    dice = acc.mean_foreground_dice()
    print(f"ldseg tiny e2e: test foreground Dice {dice:.3f} per class {acc.dice()}, "
          f"{time.monotonic() - t0:.0f} s")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["losses"]["model"] for r in recs if r["type"] == "step"]
    assert res.finished and (tmp_path / "run" / "model.safetensors").is_file()
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert dice > 0.2, (dice, acc.dice())  # measured 0.268 (seed 0, 100 steps)


# ------------------------------------------------------------------- issue 20: stride, LR decay, Table V
@pytest.mark.parametrize("stride", [16, 8, 4])
def test_training_latent_follows_the_stride_key(stride):
    m = make(latent_stride=stride)
    assert m.size_divisor == 4 * stride
    out = m.forward_train(batch(2)["image"], batch(2)["label"], torch.Generator().manual_seed(0))
    for key in ("z0", "zi", "zt", "eps", "eps_hat", "zdn"):
        assert out[key].shape == (2, 1, 64 // stride, 64 // stride), key
    assert out["logits"].shape == (2, K, 64, 64)
    p = m.eval().predict_proba(batch(2)["image"][:1], generator=torch.Generator().manual_seed(0))
    assert p.shape == (1, K, 64, 64)


def test_new_keys_are_validated_by_name():
    for over, key in [({"latent_stride": 2}, "latent_stride"), ({"latent_stride": "8"}, "latent_stride"),
                      ({"lr_decay": 0.0}, "lr_decay"), ({"lr_decay": 1.5}, "lr_decay"),
                      ({"label_downsampler": "pool"}, "label_downsampler"),
                      ({"image_downsampler": "learned"}, "image_downsampler"),
                      ({"latent_stride": 4, "crop_px": 40}, "crop_px=40")]:
        with pytest.raises(ConfigError, match=key):
            LDSegConfig.from_dict({**LDSegSegmenter.presets["tiny"], **over})
    LDSegConfig.from_dict({**LDSegSegmenter.presets["tiny"], "latent_stride": 4, "crop_px": 48})  # 3 x 16


def test_lr_decay_formula_and_presets():
    from ldiffusion.methods.ldseg import lr_decay_multiplier

    # lr(step) = lr * decay ** floor(step / steps_per_epoch); 10 steps per epoch, decay 0.9
    assert lr_decay_multiplier(0, 10, 0.9) == 1.0
    assert lr_decay_multiplier(19, 10, 0.9) == pytest.approx(0.9)
    assert lr_decay_multiplier(35, 10, 0.9) == pytest.approx(0.729)
    m = make(lr_decay=0.5)
    assert m.lr_multiplier("main", 7, 3) == 0.25
    decays = [LDSegSegmenter.presets[p].get("lr_decay", 1.0) for p in ("tiny", "small", "paper")]
    assert decays == [1.0, 0.95, 0.999]
    # the floor: 0.9 ** 35 = 0.025 would go below 0.1
    assert lr_decay_multiplier(350, 10, 0.9, floor=0.1) == pytest.approx(0.1)
    assert lr_decay_multiplier(19, 10, 0.9, floor=0.1) == pytest.approx(0.9)  # above the floor: untouched
    assert make(lr_decay=0.5, lr_decay_floor=0.2).lr_multiplier("main", 70, 3) == pytest.approx(0.2)
    floors = [LDSegSegmenter.presets[p].get("lr_decay_floor", 0.0) for p in ("tiny", "small", "paper")]
    assert floors == [0.0, 0.1, 0.0]
    with pytest.raises(ConfigError, match="lr_decay_floor"):
        LDSegConfig.from_dict({**LDSegSegmenter.presets["tiny"], "lr_decay_floor": 1.5})


def test_fit_applies_the_lr_decay_per_epoch(synth_root, tmp_path):
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.train.loop import fit

    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=64), seed=0)
    per_epoch = len(train) // 4
    assert per_epoch >= 2
    d = {**LDSegSegmenter.presets["tiny"], "steps": 2 * per_epoch + 1, "batch_size": 4, "lr": 1e-3,
         "lr_decay": 0.5, "val_every": 0, "ckpt_every": 50}
    m = LDSegSegmenter(LDSegConfig.from_dict(d), num_classes=5)
    fit(m, train, None, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"]["model"] for r in recs if r["type"] == "step"}  # rate of step `step` (1-based)
    for step in (1, per_epoch + 1, 2 * per_epoch + 1):
        assert lrs[step] == pytest.approx(1e-3 * 0.5 ** ((step - 1) // per_epoch)), (step, lrs)
    assert lrs[per_epoch] == pytest.approx(1e-3)


@pytest.mark.parametrize(("label_ds", "image_ds"), [("nearest", "nearest"), ("encoder", "nearest"),
                                                    ("nearest", "encoder")])
def test_table_v_rows_train_and_predict(label_ds, image_ds):
    m = make(label_downsampler=label_ds, image_downsampler=image_ds)
    out = m.training_step(batch(2), torch.Generator().manual_seed(0), "main")
    assert torch.isfinite(out["model"])
    out["model"].backward()
    assert m.decoder.out.weight.grad is not None
    p = m.eval().predict_proba(batch(2)["image"][:1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(p.sum(1), torch.ones(1, 64, 64))


def test_resnet_image_encoder_trains_and_needs_its_multiple():
    m = make(image_downsampler="resnet18", latent_stride=4)
    assert type(m.image_encoder).__name__ == "ResNetImageEncoder" and m.size_divisor == 32
    out = m.training_step(batch(2), torch.Generator().manual_seed(0), "main")
    out["model"].backward()
    assert m.image_encoder.body.head.weight.grad is not None
    p = m.eval().predict_proba(torch.rand(1, 3, 32, 64), generator=torch.Generator().manual_seed(0))
    assert p.shape == (1, K, 32, 64)
    with pytest.raises(InputError, match="divisible by 32"):  # stride 4 alone would accept 48
        m.predict_proba(torch.rand(1, 3, 48, 48))


# ------------------------------------------------------------------- issue 20: class balancing
def test_class_weights_are_the_inverse_frequencies_of_the_pixels_seen():
    m = make(class_weights="inverse_freq", class_weight_max=4.0)
    assert "class_counts" in m.state_dict() and "class_counts" not in m.inference_state_dict()
    assert make().class_counts is None  # paper setting: no buffer at all
    b = batch(2)
    m.train().training_step(b, torch.Generator().manual_seed(0), "main")
    n = torch.bincount(b["label"].reshape(-1), minlength=K).double()
    assert m.class_counts.tolist() == n.tolist()
    f = n / n.sum()
    assert m.class_weight_vector().tolist() == pytest.approx((1 / (K * f)).clamp(max=4.0).tolist(), rel=1e-6)


def test_weighted_ce_is_the_weighted_mean_of_the_pixel_losses():
    plain, weighted = make(), make(class_weights="inverse_freq", class_weight_max=100.0)
    unzero(plain)
    weighted.load_state_dict(plain.state_dict(), strict=False)
    b = batch(2)
    lp = plain.train().training_step(b, torch.Generator().manual_seed(0), "main")
    lw = weighted.train().training_step(b, torch.Generator().manual_seed(0), "main")
    logits = plain.forward_train(b["image"], b["label"], torch.Generator().manual_seed(0))["logits"].float()
    pixel_ce = torch.nn.functional.cross_entropy(logits, b["label"], reduction="none")
    w = weighted.class_weight_vector()[b["label"]]
    assert lw["log/ce"].item() == pytest.approx(((w * pixel_ce).sum() / w.sum()).item(), rel=1e-4)
    assert lp["log/ce"].item() == pytest.approx(pixel_ce.mean().item(), rel=1e-4)
    assert lw["log/ce"].item() != pytest.approx(lp["log/ce"].item(), rel=1e-3)  # the weights change the loss
    with pytest.raises(ConfigError, match="class_weight_max"):
        LDSegConfig.from_dict({**LDSegSegmenter.presets["tiny"], "class_weight_max": 0.5})
    with pytest.raises(ConfigError, match="class_weights"):
        LDSegConfig.from_dict({**LDSegSegmenter.presets["tiny"], "class_weights": "median"})


# ------------------------------------------------------------------- wider latents (issue 20, off the paper)
def test_latent_channel_keys_shape_training_and_sampling():
    m = make(latent_stride=8, latent_channels=3, image_latent_channels=5)
    unzero(m)
    b = batch(2)
    out = m.forward_train(b["image"], b["label"], torch.Generator().manual_seed(0))
    for key in ("z0", "zt", "eps", "eps_hat", "zdn"):
        assert out[key].shape == (2, 3, 8, 8), key
    assert out["zi"].shape == (2, 5, 8, 8)
    # z0 is standardised per sample over (C, h, w), as with one channel
    assert torch.allclose(out["z0"].mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    loss = m.training_step(b, torch.Generator().manual_seed(0), "main")["model"]
    loss.backward()
    assert m.denoiser.head.weight.grad is not None and m.denoiser.head.weight.shape[0] == 3
    p = m.eval().predict_proba(b["image"][:1], generator=torch.Generator().manual_seed(0))
    assert p.shape == (1, K, 64, 64)
    assert torch.allclose(p.sum(1), torch.ones(1, 64, 64), atol=1e-5)


def test_latent_channel_keys_are_checked_by_name():
    for over, key in [({"latent_channels": 0}, "latent_channels"),
                      ({"image_latent_channels": 0}, "image_latent_channels"),
                      ({"latent_channels": 2, "label_downsampler": "nearest"}, "latent_channels=2"),
                      ({"image_latent_channels": 4, "image_downsampler": "nearest"},
                       "image_latent_channels=4")]:
        with pytest.raises(ConfigError, match=key):
            make(**over)


# --------------------------------------------- t at the sampler's points (issue 20, off the paper)
def test_grid_t_share_draws_the_sampler_points():
    draw = torch.Generator
    # p = 0 (paper): the draw is the plain uniform one, number for number
    assert torch.equal(make().draw_t(16, draw().manual_seed(3)),
                       torch.randint(0, 1000, (16,), generator=draw().manual_seed(3)))
    # p = 1 with K = 2: every t is T-1, the one point where the 2-step sampler calls the denoiser
    assert make(grid_t_share=1.0).draw_t(32, draw().manual_seed(0)).tolist() == [999] * 32
    # p = 1 with K = 3: only the grid points above 0, both of them
    points = set(ddim_grid(1000, 3)[:-1].long().tolist())
    t3 = make(grid_t_share=1.0, ddim_steps=3).draw_t(64, draw().manual_seed(0))
    assert set(t3.tolist()) == points == {999, 500}
    # p = 0.5: about half of the draws at T-1, the rest spread over {0..T-1}
    half = make(grid_t_share=0.5).draw_t(4000, draw().manual_seed(0))
    share = (half == 999).float().mean().item()
    assert 0.46 < share < 0.54
    assert len(set(half[half != 999].tolist())) > 500
    # the training pass uses it
    m = make(grid_t_share=1.0)
    b = batch(2)
    assert m.forward_train(b["image"], b["label"], draw().manual_seed(0))["t"].tolist() == [999, 999]
    with pytest.raises(ConfigError, match="grid_t_share"):
        make(grid_t_share=1.5)


def test_small_preset_uses_the_resnet_encoder_at_stride_8_and_paper_keeps_the_paper_encoder():
    """`small` departs from the paper (chosen on validation, docs/results.md seventeenth run); `paper` not."""
    from ldiffusion.nets.ldseg_resnet import ResNetImageEncoder

    small = LDSegConfig.from_dict({**LDSegSegmenter.presets["small"], "preset": "small"})
    m = LDSegSegmenter(small, num_classes=K)
    assert isinstance(m.image_encoder, ResNetImageEncoder)
    zi = m.image_encoder(m.preprocess(torch.rand(1, 3, 64, 64)))
    assert zi.shape == (1, 16, 8, 8)  # 16 values per 8 x 8 block (twenty-second run)
    assert m.decoder.skip_channels == {2: 64, 4: 64}  # twenty-first run: skips into the label decoder
    assert small.prediction == "v" and small.ema_scope == "all"  # twenty-second run
    assert [blk.body[0].out_channels for blk in m.decoder.blocks] == [32, 64, 32, 16]  # twenty-third run
    assert m.image_encoder_ema is not None and m.decoder_ema is not None
    paper = LDSegSegmenter.presets["paper"]
    assert paper.get("image_downsampler", "encoder") == "encoder" and paper.get("latent_stride", 16) == 16
    assert not paper.get("decoder_skips", False) and paper.get("prediction", "eps") == "eps"
    assert paper.get("decoder_widths") is None


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_decoder_skips_feed_the_image_features_finer_than_the_latent(stride):
    m = make(image_downsampler="resnet18", latent_stride=stride, decoder_skips=True)
    unzero(m)
    # the decoder blocks at the strides finer than the latent take the encoder's features of that stride
    expected = {s: c for s, c in {2: 64, 4: 64, 8: 128}.items() if s < stride}
    assert m.decoder.skip_channels == expected
    for block, st in zip(m.decoder.blocks, m.decoder.block_strides, strict=True):
        assert block.body[0].in_channels == block.body[0].out_channels + expected.get(st, 0)
    b = batch(2)
    g = torch.Generator().manual_seed(0)
    loss = m.training_step(b, g, "main")["model"]
    loss.backward()
    # the skip features reach the loss: the encoder's stem gets a gradient through them as well
    assert m.image_encoder.body.stem[0].weight.grad is not None
    p = m.eval().predict_proba(b["image"][:1], generator=torch.Generator().manual_seed(0))
    assert p.shape == (1, K, 64, 64)
    # the latent still matters: two latents decode to different logits with the same image features
    x = m.preprocess(b["image"][:1])
    zi, skips = m.encode_image(x)
    z = torch.randn(2, 1, *zi.shape[2:], generator=torch.Generator().manual_seed(3))
    two = m.decoder(z, {s: f.expand(2, -1, -1, -1) for s, f in skips.items()})
    assert not torch.allclose(two[0], two[1])
    with pytest.raises(InputError, match="strides"):
        m.decoder(z)


def test_decoder_skips_need_the_resnet_image_encoder():
    with pytest.raises(ConfigError, match="decoder_skips"):
        make(decoder_skips=True)
    assert make(image_downsampler="resnet18", latent_stride=8).decoder.skip_channels == {}


def test_decoder_widths_key_sets_the_label_decoder_blocks():
    """None keeps the arch preset's widths; a 4-tuple replaces them, with the skips still concatenated."""
    assert [blk.body[0].out_channels for blk in make().decoder.blocks] == [16, 32, 32, 16]  # tiny preset
    m = make(image_downsampler="resnet18", latent_stride=8, decoder_skips=True, decoder_widths=[8, 12, 6, 4])
    assert [blk.body[0].out_channels for blk in m.decoder.blocks] == [8, 12, 6, 4]
    assert [blk.body[0].in_channels for blk in m.decoder.blocks] == [8, 12 + 64, 6 + 64, 4]
    assert m.decoder.out.in_channels == 4
    b = batch(2)
    m.training_step(b, torch.Generator().manual_seed(0), "main")["model"].backward()
    assert m.eval().predict_proba(b["image"][:1]).shape == (1, K, 64, 64)
    with pytest.raises(ConfigError, match=r"decoder_widths\[2\]"):
        make(decoder_widths=[8, 8, 0, 8])
    with pytest.raises(ConfigError, match="decoder_widths"):
        make(decoder_widths=[8, 8, 8])


# ----------------------------------------------------------------------------- v-prediction
@pytest.mark.parametrize("t", [0, 500, 999])
def test_v_form_recovers_x0_and_eps(t):
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    ab = cosine_alpha_bar(torch.tensor(t)).float()
    zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    v = v_target(z0, eps, ab)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * z0)
    x0, e = from_v(zt, v, ab)
    assert torch.allclose(x0, z0, atol=1e-5) and torch.allclose(e, eps, atol=1e-5)


def test_v_form_keeps_x0_well_conditioned_at_the_last_step():
    """A 1e-3 error in the denoiser's output moves x0 by about 1e-3 in the v form, 0.642 in the eps form."""
    z0, eps = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    ab = cosine_alpha_bar(torch.tensor(999)).float()
    zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    x0_v, _ = from_v(zt, v_target(z0, eps, ab) + 1e-3, ab)
    x0_eps = (zt - (1 - ab).sqrt() * (eps + 1e-3)) / ab.sqrt()
    assert float((x0_v - z0).abs().max()) < 1.1e-3
    assert float((x0_eps - z0).abs().max()) > 0.6


def test_v_prediction_trains_on_v_and_decodes_the_standardised_x0():
    m = make(prediction="v")
    b = batch()
    out = m.forward_train(b["image"], b["label"], torch.Generator().manual_seed(0))
    ab = m.alphas_cumprod[out["t"]].float().view(-1, 1, 1, 1)
    assert torch.allclose(out["target"], v_target(out["z0"], out["eps"], ab), atol=1e-6)
    x0_hat, eps_hat = from_v(out["zt"], out["pred"], ab)
    assert torch.allclose(out["eps_hat"], eps_hat, atol=1e-6)
    assert torch.allclose(out["zdn"], renormalize(x0_hat, "sample"), atol=1e-5)
    step = m.training_step(b, torch.Generator().manual_seed(0), "main")
    mse = torch.nn.functional.mse_loss(out["pred"], out["target"]).detach()
    assert float(step["log/mse"]) == pytest.approx(float(mse), rel=1e-5)
    eps_form = make().forward_train(b["image"], b["label"], torch.Generator().manual_seed(0))
    assert torch.equal(eps_form["target"], eps_form["eps"])
    assert torch.equal(eps_form["pred"], eps_form["eps_hat"])


def test_v_prediction_sampler_decodes_the_denoisers_x0_at_t_max():
    """With K = 2 the sampled latent is the standardised x0 = sqrt(abar) z_T - sqrt(1 - abar) v_hat."""
    m = make(prediction="v")
    unzero(m)
    m.eval()
    seen = {}

    class Capture(torch.nn.Module):
        def forward(self, z, skips=None):
            seen["z"] = z.clone()
            return torch.zeros(z.shape[0], K, z.shape[2] * 16, z.shape[3] * 16)

    zi = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    m.decoder = Capture()
    m.sample_logits(zi, [11])
    z_t = renormalize(torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(11)), "sample")
    with torch.no_grad():
        v_hat = m.denoiser(torch.cat([z_t, zi], 1), torch.full((1,), 999.0))
    ab = cosine_alpha_bar(torch.tensor(999.0)).float()
    want = renormalize(ab.sqrt() * z_t - (1 - ab).sqrt() * v_hat, "sample")
    assert torch.allclose(seen["z"], want, atol=1e-4)


def test_prediction_key_is_checked_by_name():
    with pytest.raises(ConfigError, match="prediction"):
        LDSegConfig.from_dict({"prediction": "x0"})
    with pytest.raises(ConfigError, match="ema_scope"):
        LDSegConfig.from_dict({"ema_scope": "decoder"})


def test_a_config_written_before_the_new_keys_keeps_eps_and_the_denoiser_average():
    """Run folders store the whole config; one written before `prediction` / `ema_scope` lacks them."""
    small = {**LDSegSegmenter.presets["small"], "preset": "small"}
    old = {k: v for k, v in small.items() if k not in ("prediction", "ema_scope")}
    cfg = LDSegConfig.from_dict(old)
    assert cfg.prediction == "eps" and cfg.ema_scope == "denoiser"
