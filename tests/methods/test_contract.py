"""Contract test walked over every registered segmenter (timm/smp style)."""

from __future__ import annotations

import pytest
import torch

from ldiffusion.data.dataset import SegmentationDataset
from ldiffusion.data.transforms import TrainTransform
from ldiffusion.methods import METHODS, Segmenter, create_method, load_segmenter
from ldiffusion.train.loop import fit

SEGMENTERS = [n for n in METHODS.names() if issubclass(METHODS.get(n), Segmenter)]
K = 5


def _batch(root, n=4):
    ds = SegmentationDataset(root, "train", transform=TrainTransform(crop_px=64), seed=0)
    items = [ds[i] for i in range(n)]
    return {
        "image": torch.stack([x["image"] for x in items]),
        "label": torch.stack([x["label"] for x in items]),
        "id": [x["id"] for x in items],
        "annotated": torch.tensor([x["annotated"] for x in items]),
    }


@pytest.mark.parametrize("name", SEGMENTERS)
def test_fit_two_steps_changes_weights_and_loss_finite(name, synth_root, tmp_path):
    cls = METHODS.get(name)
    m = create_method(name, preset="tiny", num_classes=K,
                      overrides=[*(f"{k}=2" for k in cls.stage_step_keys), "val_every=0"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=64), seed=0)
    fit(m, train, None, tmp_path / "run", progress=False)
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())
    import json

    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "step"]
    n_stages = len(m.stages())
    assert len(steps) == 2 * n_stages and all(
        torch.isfinite(torch.tensor(list(r["losses"].values()))).all() for r in steps
    )


@pytest.mark.parametrize("name", SEGMENTERS)
def test_steps_on_fixed_batch_lower_loss(name, synth_root):
    m = create_method(name, preset="tiny", num_classes=K)
    batch = _batch(synth_root)
    stage = m.stages()[0]
    opts = {k: torch.optim.Adam(list(s.params), lr=s.lr, betas=s.betas) for k, s in stage.optimizers.items()}
    losses = []
    for i in range(8):
        out = m.training_step(batch, torch.Generator().manual_seed(i), stage.name)
        losses.append(sum(float(out[k]) for k in stage.optimizers))
        for k, o in opts.items():
            o.zero_grad()
            out[k].backward(retain_graph=True)
            o.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", SEGMENTERS)
def test_predict_proba_save_load_and_determinism(name, synth_root, tmp_path):
    m = create_method(name, preset="tiny", num_classes=K).eval()
    x = _batch(synth_root, 2)["image"]
    p1 = m.predict_proba(x, generator=torch.Generator().manual_seed(3))
    assert p1.shape == (2, K, 64, 64)
    torch.testing.assert_close(p1.sum(1), torch.ones(2, 64, 64))
    p2 = m.predict_proba(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(p1, p2)
    probs, unc = m.predict_with_uncertainty(x, generator=torch.Generator().manual_seed(3))
    assert probs.shape == p1.shape and unc.shape == (2, 64, 64)
    m.save(tmp_path / "run")
    m2 = load_segmenter(tmp_path / "run")
    assert type(m2) is type(m) and m2.cfg == m.cfg and m2.num_classes == K
    assert torch.equal(m2.predict_proba(x, generator=torch.Generator().manual_seed(3)), p1)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_same_seed_same_init(name):
    a = create_method(name, preset="tiny", num_classes=K)
    b = create_method(name, preset="tiny", num_classes=K)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
