"""cDAL method: presets, attention, R1, posterior sampling, checkpoints, ablations, e2e (METHODS Part 3)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from ldiffusion.core.errors import ConfigError
from ldiffusion.core.io import load_weights
from ldiffusion.methods import METHODS, resolve_config
from ldiffusion.methods.cdal import CDALConfig, CDALMethod, r1_penalty
from ldiffusion.nets.cdal import CDALDiscriminator

K = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep these CPU tests on one thread (the test machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    return CDALConfig.from_dict({**CDALMethod.presets["tiny"], "preset": "tiny", **kw})


def _method(num_classes=K, seed=0, **kw):
    cfg = _cfg(seed=seed, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return CDALMethod(cfg, num_classes=num_classes)


def _batch(b=4, s=32, num_classes=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, s, s, generator=g)
    label = torch.randint(0, num_classes, (b, s // 8, s // 8), generator=g)
    label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky maps, like objects
    label[0, :2] = 255
    return {"image": image, "label": label, "id": [str(i) for i in range(b)],
            "annotated": torch.ones(b, dtype=torch.bool)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- config
def test_presets_resolve_and_validate():
    for name in ("tiny", "small", "paper"):
        cfg = CDALConfig.from_dict({**CDALMethod.presets[name], "preset": name})
        assert cfg.betas == (0.5, 0.9) and cfg.beta_min == 0.1 and cfg.beta_max == 20.0
        assert cfg.lambda_adv == 0.0 and cfg.use_attention and cfg.use_latent
        assert cfg.attn_abs and cfg.attn_norm == "minmax"
    assert CDALConfig.from_dict(CDALMethod.presets["paper"]).T == 4
    # small predicts with 10 chains (chosen on CoNSeP validation) and validates with 5, as before
    small = CDALConfig.from_dict(CDALMethod.presets["small"])
    assert (small.n_samples, small.val_n_samples) == (10, 5)
    paper = CDALConfig.from_dict(CDALMethod.presets["paper"])
    assert (paper.n_samples, paper.val_n_samples) == (5, None)
    with pytest.raises(ConfigError, match="attn_norm"):
        _cfg(attn_norm="softmax")
    with pytest.raises(ConfigError, match="crop_px"):
        _cfg(crop_px=60)
    with pytest.raises(ConfigError, match="attn_scale=12"):
        _method(attn_scale=12)


def test_registered_as_cdal():
    if "cdal" not in METHODS:
        pytest.skip("'cdal' is not yet registered in ldiffusion.methods._register_builtin")
    assert METHODS.get("cdal") is CDALMethod
    assert resolve_config("cdal", preset="tiny").T == 2


def test_attention_index_follows_scale():
    assert _method().attn_feature_index == 2  # tiny D at 64 px: 0:64, 1:32, 2:16
    assert _method(crop_px=32, attn_scale=8).attn_feature_index == 2
    assert _method(attn_index=4).attn_feature_index == 4


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize(("attn_abs", "attn_norm"), [(True, "minmax"), (True, "none"), (False, "sigmoid"),
                                                     (False, "minmax")])
def test_attention_map_shape_and_non_negative(attn_abs, attn_norm):
    m = _method(attn_abs=attn_abs, attn_norm=attn_norm)
    x0, _ = m.encode_labels(_batch(2, 64)["label"])
    xp, xk = m.process.q_sample_pair(x0, torch.tensor([1, 2]), _gen(0))
    a = m.attention_map(xp, xk, torch.tensor([0, 1]))
    assert a.shape == (2, 1, 64, 64)  # the label's spatial size
    assert bool((a >= 0).all()) and torch.isfinite(a).all()
    assert not a.requires_grad
    if attn_norm in ("minmax", "sigmoid"):
        assert float(a.max()) <= 1.0


def test_raw_attention_is_the_code_channel_mean():
    m = _method(attn_abs=False, attn_norm="none")
    x0, _ = m.encode_labels(_batch(2, 64)["label"])
    xp, xk = m.process.q_sample_pair(x0, 1, _gen(0))
    t = torch.zeros(2, dtype=torch.long)
    f = m.disc.get_features(xp, xk, t)[2].mean(1, keepdim=True)
    ref = torch.nn.functional.interpolate(f, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(m.attention_map(xp, xk, t), ref)


def test_minmax_constant_map_is_one():
    m = _method()
    with torch.no_grad():
        for p in m.disc.parameters():
            p.zero_()
    x = torch.randn(2, K, 32, 32)
    assert torch.equal(m.attention_map(x, x, torch.zeros(2, dtype=torch.long)), torch.ones(2, 1, 32, 32))


# ---------------------------------------------------------------------------------------------- R1
def test_r1_zero_for_discriminator_constant_in_its_input():
    d = CDALDiscriminator(1, ngf=4, t_emb_dim=8, n_down=2)
    with torch.no_grad():
        d.start.weight.zero_()  # D no longer depends on (x_prev, x_t)
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    r1 = r1_penalty(d(x, torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)), x, 1.0)
    assert float(r1.detach()) == 0.0


def test_r1_non_zero_and_finite_for_real_discriminator():
    d = CDALDiscriminator(1, ngf=4, t_emb_dim=8, n_down=2, init="default")
    x = torch.randn(4, 1, 16, 16, requires_grad=True)
    r1 = r1_penalty(d(x, torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)), x, 1.0)
    assert torch.isfinite(r1) and float(r1) > 0
    (g,) = torch.autograd.grad(r1, next(d.parameters()))  # create_graph: R1 back-propagates into D
    assert torch.isfinite(g).all()


def test_lazy_r1_every_k_steps():
    m = _method(crop_px=32, attn_scale=8, lazy_r1=2)
    with_r1 = ["log/r1" in m.training_step(_batch(2, 16), _gen(i), "main") for i in range(4)]
    assert with_r1 == [True, False, True, False]
    assert int(m.train_steps) == 4


def test_d_every_skips_the_discriminator_and_counts_r1_on_its_updates():
    m = _method(crop_px=32, attn_scale=8, lazy_r1=2, d_every=2)
    outs = [m.training_step(_batch(2, 16), _gen(i), "main") for i in range(6)]
    assert [o["d"].requires_grad for o in outs] == [True, False, True, False, True, False]
    assert all(o["g"].requires_grad for o in outs)
    # D updates at steps 0, 2, 4; R1 on every second update: steps 0 and 4
    assert ["log/r1" in o for o in outs] == [True, False, False, False, True, False]
    assert [float(o["d"]) for o in outs[1::2]] == [0.0, 0.0, 0.0]


def test_d_every_leaves_the_discriminator_untouched_between_updates():
    """Through the loop's `apply_losses`: D's weights change on its update steps only, G's on every step."""
    from ldiffusion.train.loop import apply_losses

    m = _method(crop_px=32, attn_scale=8, d_every=3)
    specs = m.stages()[0].optimizers
    opts = {k: torch.optim.Adam(s.params, s.lr, betas=s.betas) for k, s in specs.items()}
    d_changed, g_changed = [], []
    for i in range(4):
        d0 = [p.detach().clone() for p in m.disc.parameters()]
        g0 = [p.detach().clone() for p in m.gen.parameters()]
        apply_losses(m.training_step(_batch(2, 16), _gen(i), "main"), specs, opts, None, "main", i)
        d_changed.append(any(not torch.equal(p, q) for p, q in zip(m.disc.parameters(), d0, strict=True)))
        g_changed.append(any(not torch.equal(p, q) for p, q in zip(m.gen.parameters(), g0, strict=True)))
    assert d_changed == [True, False, False, True]
    assert g_changed == [True, True, True, True]


def test_d_every_is_validated():
    with pytest.raises(ConfigError, match="d_every"):
        _cfg(d_every=0)

# ---------------------------------------------------------------------------------------------- sampling
def test_posterior_k1_returns_x0_hat():
    m = _method()
    x0_hat, xk = torch.rand(2, K, 8, 8) * 2 - 1, torch.randn(2, K, 8, 8)
    assert torch.equal(m.process.posterior_sample(x0_hat, xk, 1, _gen(0)), x0_hat)


def test_t1_sample_is_generator_output():
    m = _method(T=1, n_samples=1).eval()
    img = torch.rand(1, 3, 32, 32)
    s = m.sample(img, generator=_gen(5))
    g = _gen(5)
    x_t = torch.randn(1, K, 32, 32, generator=g)
    z = torch.randn(1, m.cfg.nz, generator=g)
    with torch.no_grad():
        ref = m.gen(x_t, torch.zeros(1, dtype=torch.long), z, m.preprocess(img))
    assert torch.equal(s[0], ref)


@pytest.mark.parametrize("T", [1, 2, 3, 4])
def test_sampling_gives_valid_class_maps(T):
    m = _method(T=T, n_samples=2).eval()
    img = torch.rand(2, 3, 20, 20)  # padded internally to 24
    probs, unc = m.predict_with_uncertainty(img, generator=_gen(0))
    pred = m.predict(img, generator=_gen(0))
    assert probs.shape == (2, K, 20, 20) and unc.shape == (2, 20, 20) and pred.shape == (2, 20, 20)
    assert torch.allclose(probs.sum(1), torch.ones(2, 20, 20), atol=1e-5) and bool((probs >= 0).all())
    assert pred.dtype == torch.long and int(pred.min()) >= 0 and int(pred.max()) < K
    assert bool((unc >= 0).all()) and bool((unc <= 1).all())


def test_binary_task_uses_one_channel():
    m = _method(num_classes=2, n_samples=3).eval()
    assert m.label_channels == 1 and m.gen.label_channels == 1
    x0, valid = m.encode_labels(torch.tensor([[[0, 1], [255, 1]]]))
    assert x0.tolist() == [[[[-1.0, 1.0], [-1.0, 1.0]]]] and valid.tolist() == [[[[1.0, 1.0], [0.0, 1.0]]]]
    probs, unc = m.predict_with_uncertainty(torch.rand(1, 3, 32, 32), generator=_gen(0))
    assert probs.shape == (1, 2, 32, 32)
    # 3 votes: the spread is a multiple of 1/3 (the final class rounds the *mean*, not the majority)
    assert set(torch.round(unc * 3).unique().tolist()) <= {0.0, 1.0, 2.0}
    assert torch.allclose(unc * 3, torch.round(unc * 3), atol=1e-5)


def test_invert_labels_flips_polarity_only_inside():
    m, mi = _method(num_classes=2), _method(num_classes=2, invert_labels=True)
    lab = torch.tensor([[[0, 1], [1, 0]]])
    assert torch.equal(mi.encode_labels(lab)[0], -m.encode_labels(lab)[0])
    samples = torch.tensor([-0.8, 0.6]).view(2, 1, 1, 1, 1)  # (S, B, C_y, H, W)
    assert torch.allclose(mi._channel_probs(-samples), m._channel_probs(samples))
    with pytest.raises(ConfigError, match="invert_labels"):
        _method(num_classes=3, invert_labels=True)


def test_decision_rules():
    m = _method(decision="mean_round")
    p = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    assert int(m._decide(p)) == 1  # round per channel -> [0, 1, 1] -> first maximum
    assert int(_method()._decide(p)) == 2  # argmax of the mean
    assert int(m._decide(torch.full((1, 3, 1, 1), 0.5))) == 0  # nothing above 0.5 -> background


def test_single_sample_has_zero_uncertainty():
    m = _method(n_samples=1).eval()
    _, unc = m.predict_with_uncertainty(torch.rand(1, 3, 32, 32), generator=_gen(0))
    assert float(unc.abs().max()) == 0.0


def test_val_n_samples_sets_the_chains_of_validation_only():
    """val_n_samples changes the generator passes of validation (chains x T) and nothing after it."""
    m = _method(n_samples=3, val_n_samples=1).eval()
    calls = []
    m.gen.register_forward_hook(lambda *_: calls.append(1))
    batch = _batch(b=2)
    score = m.validation_score([batch], _gen(0), "main")
    assert len(calls) == 1 * m.cfg.T
    calls.clear()
    m.predict(batch["image"], generator=_gen(0))
    assert len(calls) == 3 * m.cfg.T  # predict keeps n_samples
    # val_n_samples equal to n_samples scores exactly as leaving it unset
    same = _method(n_samples=1, val_n_samples=1).eval().validation_score([batch], _gen(0), "main")
    assert same == _method(n_samples=1).eval().validation_score([batch], _gen(0), "main")
    assert 0.0 <= score <= 1.0
    with pytest.raises(ConfigError, match="val_n_samples"):
        _cfg(val_n_samples=0)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_inference_checkpoint_has_no_discriminator(tmp_path):
    m = _method(n_samples=1).eval()
    m.save(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert keys and all(k.startswith("gen.") for k in keys)
    assert not any("disc" in k for k in keys) and "train_steps" not in keys
    info = json.loads((tmp_path / "config.json").read_text())
    assert info["method"] == "cdal"
    other = _method(seed=1, n_samples=1).eval()
    other.load_inference_state_dict(load_weights(tmp_path / "model.safetensors"))
    img = torch.rand(1, 3, 32, 32)
    assert torch.equal(m.predict_proba(img, generator=_gen(2)), other.predict_proba(img, generator=_gen(2)))


def test_generator_betas_key():
    """g_betas sets the generator's Adam betas alone; D keeps the paper's betas; null means betas."""
    m = _method(crop_px=32, attn_scale=8, g_betas=[0.9, 0.999])
    opts = m.stages()[0].optimizers
    assert opts["g"].betas == (0.9, 0.999)
    assert opts["d"].betas == (0.5, 0.9)
    assert _method(crop_px=32, attn_scale=8).stages()[0].optimizers["g"].betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match="g_betas"):
        CDALConfig.from_dict({"g_betas": [0.9]})
    with pytest.raises(ConfigError, match="g_betas"):
        CDALConfig.from_dict({"g_betas": [0.9, 1.5]})


# ---------------------------------------------------------------------------------------------- training
def test_training_step_losses_and_stages():
    m = _method(crop_px=32, attn_scale=8)
    out = m.training_step(_batch(), _gen(0), "main")
    assert set(m.stages()[0].optimizers) == {"d", "g"}
    assert m.stages()[0].optimizers["g"].betas == (0.5, 0.9)
    assert {"d", "g", "log/mse", "log/attn_min", "log/attn_mean", "log/attn_max"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    # G's loss reaches only G, D's loss only D (the fake pass runs under no_grad)
    d_params, g_params = list(m.disc.parameters()), list(m.gen.parameters())
    for loss, params in ((out["g"], d_params), (out["d"], g_params)):
        assert all(g is None for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def test_generator_loss_falls_on_fixed_batch():
    m = _method(crop_px=32, attn_scale=8, use_attention=False)
    batch = _batch()
    opt = torch.optim.Adam(m.gen.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(8):
        loss = m.training_step(batch, _gen(0), "main")["g"]
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


def test_seeded_determinism():
    a, b = _method(crop_px=32, attn_scale=8), _method(crop_px=32, attn_scale=8)
    la = a.training_step(_batch(), _gen(3), "main")
    lb = b.training_step(_batch(), _gen(3), "main")
    assert all(torch.equal(la[k], lb[k]) for k in la)
    img = torch.rand(1, 3, 32, 32)
    pa, pb = a.eval().predict_proba(img, generator=_gen(1)), b.eval().predict_proba(img, generator=_gen(1))
    assert torch.equal(pa, pb)
    assert torch.equal(a.predict_proba(img), a.predict_proba(img))  # generator=None: seeded from cfg.seed
    assert not torch.equal(a.predict_proba(img, generator=_gen(1)), a.predict_proba(img, generator=_gen(2)))


def test_without_latent_x0_hat_is_deterministic():
    m = _method(use_latent=False).eval()
    with torch.no_grad():  # wake the zero-initialised convs so z could matter
        for mod in m.gen.modules():
            if isinstance(mod, torch.nn.Conv2d) and not bool(mod.weight.abs().gt(1e-3).any()):
                mod.weight.normal_(0, 0.1)
    xt, img, t = torch.randn(2, K, 32, 32), m.preprocess(torch.rand(2, 3, 32, 32)), torch.tensor([0, 1])
    z1, z2 = m.sample_z(2, _gen(0), xt.device), m.sample_z(2, _gen(1), xt.device)
    assert torch.equal(z1, torch.zeros_like(z1))
    with torch.no_grad():
        assert torch.equal(m.gen(xt, t, z1, img), m.gen(xt, t, z2, img))
    m2 = _method(use_latent=True).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert not torch.equal(m2.gen(xt, t, m2.sample_z(2, _gen(0), xt.device), img),
                               m2.gen(xt, t, m2.sample_z(2, _gen(1), xt.device), img))


def test_without_attention_trains_generator_only():
    m = _method(crop_px=32, attn_scale=8, use_attention=False)
    assert set(m.stages()[0].optimizers) == {"g"}
    out = m.training_step(_batch(), _gen(0), "main")
    assert "d" not in out and "log/attn_mean" not in out
    m_adv = _method(crop_px=32, attn_scale=8, use_attention=False, lambda_adv=0.1)
    out = m_adv.training_step(_batch(), _gen(0), "main")
    assert set(m_adv.stages()[0].optimizers) == {"d", "g"} and "log/g_adv" in out


def test_unannotated_batch_gives_zero_generator_loss():
    m = _method(crop_px=32, attn_scale=8)
    batch = _batch()
    batch["label"].fill_(255)
    out = m.training_step(batch, _gen(0), "main")
    assert float(out["g"]) == 0.0 and torch.isfinite(out["d"])


# ---------------------------------------------------------------------------------------------- through fit
def _fit(m, synth_root, out, crop, **kw):
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.train.loop import fit

    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=crop), seed=0)
    val = SegmentationDataset(synth_root, "val")
    return fit(m, train, val, out, progress=False, **kw)


def test_fit_resume_matches_uninterrupted_run(synth_root, tmp_path):
    kw = {"crop_px": 32, "attn_scale": 8, "steps": 3, "val_every": 0, "ckpt_every": 1, "n_samples": 1}
    a = _method(**kw)
    _fit(a, synth_root, tmp_path / "a", 32)
    b = _method(**kw)
    r = _fit(b, synth_root, tmp_path / "b", 32, max_steps=2)
    assert not r.finished
    b = _method(**kw)
    _fit(b, synth_root, tmp_path / "b", 32, resume=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert int(sb["train_steps"]) == 3
    assert all(k.startswith("gen.") for k in load_file(str(tmp_path / "b" / "model.safetensors")))


@pytest.mark.e2e
def test_e2e_tiny_synthetic_dice(synth_root, tmp_path):
    """Tiny cDAL on the synthetic set (24 x 64 px, 5 classes) through `fit`.

    Settings: tiny preset, 32-px crops, lr_g 2e-3, lr_d 4e-4, 80 steps, 2 samples. Measured on the
    test split: mean foreground Dice 0.96 (predicting background everywhere scores 0.0).
    """
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.train.validation import DiceAccumulator

    t0 = time.process_time()
    m = _method(crop_px=32, attn_scale=8, lr_g=2e-3, lr_d=4e-4, steps=80, val_every=40, ckpt_every=80)
    r = _fit(m, synth_root, tmp_path / "run", 32)
    assert r.finished and r.best_score is not None
    test = SegmentationDataset(synth_root, "test")
    acc, acc_bg = DiceAccumulator(K), DiceAccumulator(K)
    for i in range(len(test)):
        item = test[i]
        pred = m.predict(item["image"][None], generator=_gen(1))
        acc.update(pred, item["label"][None])
        acc_bg.update(torch.zeros_like(item["label"][None]), item["label"][None])
    dice = acc.mean_foreground_dice()
    assert acc_bg.mean_foreground_dice() == 0.0
    assert dice > 0.8, f"foreground Dice {dice:.3f} (measured 0.96)"
    assert time.process_time() - t0 < 180  # CPU seconds (wall time depends on machine load)


# ---------------------------------------------------------------------------------------------- issue 20
def test_class_balance_keys_are_validated_by_name():
    for over, key in [({"class_weights": "median"}, "class_weights"),
                      ({"class_weight_max": 0.5}, "class_weight_max"), ({"aux_ce": -1.0}, "aux_ce"),
                      ({"aux_dice": -0.1}, "aux_dice"),
                      ({"aux_temperature": 0.0}, "aux_temperature")]:
        with pytest.raises(ConfigError, match=key):
            _cfg(**over)
    paper = CDALConfig.from_dict({**CDALMethod.presets["paper"], "preset": "paper"})
    assert paper.class_weights == "none" and paper.aux_ce == 0.0 and paper.aux_dice == 0.0
    small = CDALConfig.from_dict({**CDALMethod.presets["small"], "preset": "small"})
    assert small.class_weights == "inverse_freq" and small.class_weight_max == 100.0 and small.aux_dice == 1.0
    # the ResNet-18 generator of `small`, chosen on CoNSeP validation; `paper` keeps the NCSN++ net
    assert (small.g_backbone, small.d_ngf, small.lr_g) == ("resnet18", 8, 1e-3)
    paper = CDALConfig.from_dict({**CDALMethod.presets["paper"], "preset": "paper"})
    assert (paper.g_backbone, paper.d_ngf, paper.lr_g) == ("ncsnpp", 64, 2e-4)


def test_class_counts_accumulate_and_weights_follow_them():
    m = _method(crop_px=32, attn_scale=8, class_weights="inverse_freq", class_weight_max=4.0)
    assert m.class_counts is not None and "class_counts" in m.state_dict()
    assert "class_counts" not in m.inference_state_dict()
    assert _method(crop_px=32, attn_scale=8).class_counts is None  # paper setting: no buffer at all
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 0, :2] = 1  # 2 px of class 1
    y[0, 3, 3] = 255
    m.update_class_counts(y)  # class 0: 13, class 1: 2
    m.update_class_counts(torch.full((1, 1, 1), 2))  # class 2: 1
    assert m.class_counts.tolist() == [13.0, 2.0, 1.0, 0.0, 0.0]
    w = m.class_weight_vector()
    # f = 13/16, 2/16, 1/16; K' = 3: w = 16/39, 16/6 = 2.667, 16/3 = 5.33 -> clipped to 4; absent -> 4
    assert w.tolist() == pytest.approx([16 / 39, 16 / 6, 4.0, 4.0, 4.0], rel=1e-6)


class _ZeroGenerator(torch.nn.Module):
    """Stand-in generator predicting x̂0 = 0, so every annotated squared error is exactly 1."""

    def forward(self, x, t, z, image):
        return torch.zeros_like(x)


def test_weighted_mse_multiplies_each_pixel_by_its_class_weight():
    kw = {"crop_px": 32, "attn_scale": 8, "use_attention": False}
    plain, weighted = _method(**kw), _method(**kw, class_weights="inverse_freq", class_weight_max=4.0)
    plain.gen = _ZeroGenerator()
    weighted.gen = _ZeroGenerator()
    batch = _batch()
    x0, valid = plain.encode_labels(batch["label"])
    image = plain.preprocess(batch["image"])
    g_plain = plain.generator_loss(x0, valid, image, _gen(5), label=batch["label"])["g"]
    assert float(g_plain) == pytest.approx(1.0)
    weighted.class_counts.copy_(torch.tensor([13.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    w = torch.tensor([16 / 39, 16 / 6, 4.0, 4.0, 4.0])
    lab = batch["label"]
    expect = float(w[lab[lab != 255]].mean())  # mean class weight over the annotated pixels
    out = weighted.generator_loss(x0, valid, image, _gen(5), label=lab)
    assert float(out["g"]) == pytest.approx(expect, rel=1e-5)
    assert float(out["log/w_max"]) == pytest.approx(4.0)
    # without labels (a caller of the old signature) the loss is the paper's plain MSE
    assert float(weighted.generator_loss(x0, valid, image, _gen(5))["g"]) == pytest.approx(1.0)
    # weights of the batch's own counts average to 1 over its pixels: the loss scale is unchanged
    weighted.class_counts.zero_()
    weighted.update_class_counts(lab)
    g_own = weighted.generator_loss(x0, valid, image, _gen(5), label=lab)["g"]
    assert float(g_own) == pytest.approx(1.0, rel=1e-5)


def test_aux_losses_are_added_and_logged():
    kw = {"crop_px": 32, "attn_scale": 8}
    base = _method(**kw).training_step(_batch(), _gen(0), "main")
    m = _method(**kw, aux_ce=0.5, aux_dice=1.0, class_weights="inverse_freq")
    out = m.training_step(_batch(), _gen(0), "main")
    assert {"log/aux_ce", "log/aux_dice", "log/w_max"} <= set(out)
    assert float(out["log/aux_ce"]) > 0 and 0 < float(out["log/aux_dice"]) <= 1
    assert float(out["g"].detach()) > float(base["g"].detach())
    out["g"].backward()
    assert torch.isfinite(out["g"])


def test_binary_class_logits_follow_polarity():
    m = _method(num_classes=2, crop_px=32, attn_scale=8)
    x = torch.tensor([0.5, -0.5]).view(1, 1, 1, 2)
    lg = m.class_logits(x)
    assert lg.shape == (1, 2, 1, 2) and lg.argmax(1).tolist() == [[[1, 0]]]
    assert torch.allclose(lg[:, 1], x[:, 0] / 0.25)
    inv = _method(num_classes=2, crop_px=32, attn_scale=8, invert_labels=True)
    assert inv.class_logits(x).argmax(1).tolist() == [[[0, 1]]]


def test_fit_resume_with_class_balance_matches_uninterrupted_run(synth_root, tmp_path):
    kw = {"crop_px": 32, "attn_scale": 8, "steps": 3, "val_every": 0, "ckpt_every": 1, "n_samples": 1,
          "class_weights": "inverse_freq", "aux_ce": 0.5, "aux_dice": 1.0}
    a = _method(**kw)
    _fit(a, synth_root, tmp_path / "a", 32)
    b = _method(**kw)
    assert not _fit(b, synth_root, tmp_path / "b", 32, max_steps=2).finished
    b = _method(**kw)
    _fit(b, synth_root, tmp_path / "b", 32, resume=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert float(sb["class_counts"].sum()) > 0 and int(sb["train_steps"]) == 3


def test_resnet_backbone_trains_and_samples():
    m = _method(crop_px=32, attn_scale=8, g_backbone="resnet18")
    assert type(m.gen).__name__ == "CDALResUNetGenerator" and m.size_divisor == 32
    out = m.training_step(_batch(), _gen(0), "main")
    assert torch.isfinite(out["g"]) and torch.isfinite(out["d"])
    # a 40 px image is padded to 64 (the U-Net's multiple of 32) and cropped back
    assert m.eval().predict(torch.rand(1, 3, 40, 40), generator=_gen(0)).shape == (1, 40, 40)
    with pytest.raises(ConfigError, match="g_backbone"):
        _cfg(g_backbone="resnet50")


def test_generator_ema_is_used_at_inference_and_saved(tmp_path):
    m = _method(crop_px=32, attn_scale=8, ema=0.5)
    name = "head.weight"
    w = [m.gen.state_dict()[name].clone()]
    opt = torch.optim.Adam(m.gen.parameters(), lr=1e-2)
    for step in range(2):
        loss = m.training_step(_batch(), _gen(step), "main")["g"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.append(m.gen.state_dict()[name].clone())
    m.on_stage_end("main", [])
    # decay 0.5, folded after each optimiser step: ema = 0.25 w0 + 0.25 w1 + 0.5 w2
    assert not torch.equal(w[1], w[2])
    assert torch.allclose(m.gen_ema.state_dict()[name], 0.25 * w[0] + 0.25 * w[1] + 0.5 * w[2], atol=1e-7)
    state = m.inference_state_dict()
    assert state and all(k.startswith("gen_ema.") for k in state)
    other = _method(crop_px=32, attn_scale=8, ema=0.5)
    other.load_inference_state_dict(state)
    img = torch.rand(1, 3, 32, 32)
    assert torch.equal(other.eval().predict_proba(img, generator=_gen(0)),
                       m.eval().predict_proba(img, generator=_gen(0)))
    with pytest.raises(ConfigError, match="ema"):
        _cfg(ema=1.0)


def test_generator_ema_warmup_decay_and_averaged_batchnorm_statistics():
    m = _method(crop_px=32, attn_scale=8, g_backbone="resnet18", ema=0.99, ema_warmup=True,
                ema_buffers="average")
    bn = next(k for k, v in m.gen.state_dict().items() if k.endswith("running_mean") and v.numel() > 1)
    name = "head.weight" if "head.weight" in m.gen.state_dict() else next(
        k for k, v in m.gen.named_parameters() if v.requires_grad)
    w = [m.gen.state_dict()[name].clone()]
    stats = [m.gen.state_dict()[bn].clone()]
    opt = torch.optim.Adam(m.gen.parameters(), lr=1e-2)
    decays = []
    for step in range(3):
        decays.append(m.ema_decay())
        loss = m.training_step(_batch(), _gen(step), "main")["g"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.append(m.gen.state_dict()[name].clone())
        stats.append(m.gen.state_dict()[bn].clone())
    m.on_stage_end("main", [])
    # the n-th fold uses min(0.99, (1 + n) / (10 + n)); step k is folded lazily, at the start of step k + 1
    assert decays == pytest.approx([1 / 10, 1 / 10, 2 / 11]) and m.ema_decay() == pytest.approx(4 / 13)
    assert int(m.ema_updates) == 3
    m.ema_updates.fill_(10_000)
    assert m.ema_decay() == pytest.approx(0.99)  # the warm-up ends at ema
    m.ema_updates.fill_(3)

    def folded(seq):
        avg = seq[0]
        for n, x in enumerate(seq[1:]):
            d = (1.0 + n) / (10.0 + n)
            avg = d * avg + (1 - d) * x
        return avg

    assert torch.allclose(m.gen_ema.state_dict()[name], folded(w), atol=1e-6)
    # BatchNorm statistics are averaged like the weights, not copied from the live generator
    assert not torch.allclose(stats[-1], folded(stats))
    assert torch.allclose(m.gen_ema.state_dict()[bn], folded(stats), atol=1e-6)
    # without warm-up no counter is kept, so run folders written before the key still load
    assert "ema_updates" not in _method(crop_px=32, attn_scale=8, ema=0.5).state_dict()
    with pytest.raises(ConfigError, match="ema_buffers"):
        _cfg(ema=0.9, ema_buffers="median")
