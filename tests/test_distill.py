"""Distillation from the frozen full-precision network (distill=kd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from compress.distill import Teacher, check_distill, kd_loss, make_teacher
from compress.module import Classifier


def test_kd_loss_is_the_scaled_kl_divergence() -> None:
    torch.manual_seed(0)
    s, t, temp = torch.randn(8, 10), torch.randn(8, 10), 4.0
    p, q = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
    manual = (p * (p.log() - q.log())).sum(1).mean() * temp**2
    assert torch.allclose(kd_loss(s, t, temp), manual, atol=1e-6)
    assert kd_loss(t, t, temp).abs() < 1e-6


def test_teacher_is_a_frozen_copy_outside_the_module(resnet) -> None:
    teacher = make_teacher(OmegaConf.create({"kind": "kd", "alpha": 0.9, "temperature": 4.0}), resnet)
    module = Classifier(resnet, teacher=teacher)
    assert not any(k.startswith("teacher") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in resnet.parameters())
    module.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    with torch.no_grad():
        resnet.linear.weight.add_(1.0)  # the student moves; the teacher does not
    assert not torch.equal(teacher.model.linear.weight, resnet.linear.weight)


def test_blend_weights_cross_entropy_and_distillation(resnet) -> None:
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = resnet.eval()(x)
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(Teacher(resnet, 0.0, 4.0).blend(x, logits, ce), ce)
    assert Teacher(resnet, 1.0, 4.0).blend(x, logits, ce).abs() < 1e-5  # teacher == student


@pytest.mark.parametrize("conf, message", [
    ({"kind": "soft"}, "distill.kind='soft' is not allowed: use one of none, kd"),
    ({"kind": "kd", "alpha": 1.5, "temperature": 4}, "distill.alpha=1.5 is not allowed"),
    ({"kind": "kd", "alpha": 0.5, "temperature": 0}, "distill.temperature=0 is not allowed"),
])
def test_bad_settings_are_named(conf: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_distill(OmegaConf.create(conf))
