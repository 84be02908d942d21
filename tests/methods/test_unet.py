"""The U-Net's per-pixel weighted cross-entropy (`separation_weight`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldiffusion.methods.unet import weighted_cross_entropy


def test_weighted_cross_entropy_matches_the_plain_one_at_unit_weights_and_follows_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    target[0, 0, :3] = 255
    plain = F.cross_entropy(logits, target, ignore_index=255)
    assert weighted_cross_entropy(logits, target, None) == pytest.approx(plain.item())
    sevens = torch.full((2, 5, 6), 7.0)
    assert weighted_cross_entropy(logits, target, sevens) == pytest.approx(plain.item(), rel=1e-5)
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    w = torch.ones(2, 5, 6)
    w[1, 2, 3] = 9.0
    w[0, 0, 0] = 100.0  # an ignored pixel: its weight must not count
    labelled = target != 255
    expected = (ce * w * labelled).sum() / (w * labelled).sum()
    assert weighted_cross_entropy(logits, target, w) == pytest.approx(expected.item(), rel=1e-5)
    assert (weighted_cross_entropy(logits, target, w) - plain).abs() > 1e-3


def _unet(**over):
    from ldiffusion.methods import create_method

    overrides = [f"{k}={v}" for k, v in over.items()]
    return create_method("unet", preset="tiny", num_classes=3, overrides=overrides)


def test_ema_decay_warms_up_to_the_configured_value_and_folds_once_per_step() -> None:
    m = _unet(ema=0.99)
    decays = [m.ema_decay(n) for n in (0, 1, 90, 990)]
    assert decays == [pytest.approx(0.1), pytest.approx(2 / 11), pytest.approx(0.91), 0.99]
    before = {k: v.clone() for k, v in m.net_ema.state_dict().items()}
    batch = {"image": torch.rand(2, 3, 16, 16), "label": torch.randint(0, 3, (2, 16, 16))}
    opt = torch.optim.SGD(m.net.parameters(), lr=0.5)
    m.train()
    m.training_step(batch, torch.Generator().manual_seed(0), "main")["model"].backward()
    opt.step()
    live = {k: v.clone() for k, v in m.net.state_dict().items()}
    m.eval()
    m.inference_net()  # folds the step: ema = 0.1 * before + 0.9 * live (warm-up, n = 0)
    m.inference_net()  # nothing pending: no second fold
    assert int(m.ema_updates) == 1
    w = next(k for k, v in live.items() if v.is_floating_point() and not torch.equal(v, before[k]))
    expected = 0.1 * before[w] + 0.9 * live[w]
    torch.testing.assert_close(m.net_ema.state_dict()[w], expected)
    assert not torch.equal(m.net_ema.state_dict()[w], live[w])


def test_ema_weights_are_what_predicts_and_what_the_model_file_holds(tmp_path) -> None:
    from ldiffusion.core.io import load_weights

    m = _unet(ema=0.9)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)  # the live net drifts; the average has not folded it (nothing pending)
    x = torch.rand(1, 3, 16, 16)
    m.eval()
    avg = torch.softmax(m.net_ema(m.preprocess(x)).float(), dim=1)
    torch.testing.assert_close(m.predict_proba(x), avg)
    m.save(tmp_path)
    state = load_weights(tmp_path / "model.safetensors")
    assert set(state) == {f"net.{k}" for k in m.net.state_dict()}
    fresh = _unet(ema=0.9)
    fresh.load_inference_state_dict(state)
    fresh.eval()
    torch.testing.assert_close(fresh.predict_proba(x), avg)
    plain = _unet()  # the file loads into a U-Net without the average too
    plain.load_inference_state_dict(state)
    plain.eval()
    torch.testing.assert_close(plain.predict_proba(x), avg)


def test_ema_out_of_range_is_refused() -> None:
    from ldiffusion.core.errors import ConfigError

    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ema"):
            _unet(ema=bad)
