from __future__ import annotations

import torch

from ldiffusion.losses.dice import soft_dice_loss


def test_perfect_and_wrong_prediction():
    # target (1, 2, 2): classes 0 and 1; logits (1, 2, 2, 2) strongly predict it
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice_loss(logits, target)) < 1e-6
    # all wrong: foreground dice = (0 + 1) / (2 + 2 + 1) = 0.2 -> loss 0.8
    assert abs(float(soft_dice_loss(-logits, target)) - 0.8) < 1e-4


def test_ignore_and_absent_classes():
    target = torch.full((1, 2, 2), 255)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = soft_dice_loss(logits, target)
    assert float(loss.detach()) == 0.0
    loss.backward()
    # ignored pixels do not change the loss
    t = torch.tensor([[[1, 255], [1, 255]]])
    a = torch.randn(1, 3, 2, 2)
    b = a.clone()
    b[..., 1] = torch.randn(1, 3, 2)
    assert torch.allclose(soft_dice_loss(a, t), soft_dice_loss(b, t))
