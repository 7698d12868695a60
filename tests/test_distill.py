"""Distillation from the frozen full-precision network (distill=kd)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from compress.cells import recipe_of
from compress.config import config_hash
from compress.distill import DistillationCallback, Teacher, check_distill, kd_loss
from compress.models import resnet20, resnet32
from compress.module import Classifier


def make_teacher(conf: dict, model: torch.nn.Module) -> Teacher:
    """The teacher distill=kd's callback takes for ``model`` (as the pipeline prepares it)."""
    callback = DistillationCallback(**conf)
    callback.prepare(model)
    assert callback.teacher is not None
    return callback.teacher


def test_kd_loss_is_the_scaled_kl_divergence() -> None:
    torch.manual_seed(0)
    s, t, temp = torch.randn(8, 10), torch.randn(8, 10), 4.0
    p, q = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
    manual = (p * (p.log() - q.log())).sum(1).mean() * temp**2
    assert torch.allclose(kd_loss(s, t, temp), manual, atol=1e-6)
    assert kd_loss(t, t, temp).abs() < 1e-6


def test_teacher_is_a_frozen_copy_outside_the_module(resnet) -> None:
    teacher = make_teacher({"kind": "kd", "alpha": 0.9, "temperature": 4.0}, resnet)
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
    ({"kind": "kd", "alpha": 0.5, "temperature": 4, "teacher": 56}, "distill.teacher=56 is not allowed: use null"),
    ({"kind": "kd", "alpha": 0.5, "temperature": 4, "teacher": ""}, "distill.teacher='' is not allowed"),
])
def test_bad_settings_are_named(conf: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_distill(OmegaConf.create(conf))


def kd(teacher: object) -> dict:
    return {"kind": "kd", "alpha": 0.9, "temperature": 4.0, "teacher": teacher}


def test_teacher_from_a_checkpoint_is_its_own_network(resnet, tmp_path: Path) -> None:
    torch.manual_seed(1)
    deeper = resnet32()
    torch.save({"state_dict": {"module." + k: v for k, v in deeper.state_dict().items()}}, tmp_path / "r32.th")
    teacher = make_teacher(kd(str(tmp_path / "r32.th")), resnet)
    assert teacher.model.arch == "resnet32" and not teacher.model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), deeper.eval()(x))
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_teacher_that_is_no_resnet_is_named(resnet, tmp_path: Path) -> None:
    torch.save({"state_dict": {"fc.weight": torch.zeros(10, 4)}}, tmp_path / "mlp.th")
    with pytest.raises(ValueError, match=r"distill\.teacher='.*mlp\.th' holds weights this tool cannot rebuild"):
        make_teacher(kd(str(tmp_path / "mlp.th")), resnet)
    with pytest.raises(FileNotFoundError, match=r"distill\.teacher='.*absent\.th' is not allowed: give a model name \(resnet20, "):
        make_teacher(kd(str(tmp_path / "absent.th")), resnet)


def test_teacher_of_another_class_count_is_refused(resnet, tmp_path: Path) -> None:
    torch.save({"state_dict": resnet32(num_classes=100).state_dict()}, tmp_path / "r32c100.th")
    with pytest.raises(ValueError, match="predicts 100 classes, the student 10"):
        make_teacher(kd(str(tmp_path / "r32c100.th")), resnet)


def test_distillation_callback_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match=r"distill\.alpha=2 is not allowed"):
        DistillationCallback(alpha=2)


def test_hash_knows_the_teacher_by_its_weights(tmp_path: Path, pretrained: Path) -> None:
    cfg = {"model": {"pretrained": str(pretrained)}, "data": {}, "distill": kd(None)}
    base = config_hash(OmegaConf.create(cfg))
    assert base == config_hash(OmegaConf.create(cfg | {"distill": {k: v for k, v in kd(None).items() if k != "teacher"}}))
    torch.save({"state_dict": resnet32().state_dict()}, tmp_path / "a.th")
    (tmp_path / "b.th").write_bytes((tmp_path / "a.th").read_bytes())
    a, b = (config_hash(OmegaConf.create(cfg | {"distill": kd(str(tmp_path / n))})) for n in ("a.th", "b.th"))
    assert a == b != base  # the same weights under another path: the same computation


def test_reports_keep_runs_of_different_teachers_apart() -> None:
    assert recipe_of({"distill": kd(None)}) == "recipe: distill kd"
    assert recipe_of({"distill": kd("resnet56")}) == "recipe: distill kd from resnet56"
    assert recipe_of({"distill": kd("/w/runs/x/model.pt")}) == "recipe: distill kd from /w/runs/x/model.pt"


def test_kd_resnet56_recipe_composes_to_the_published_resnet56_teacher(hydra_compose) -> None:
    cfg = hydra_compose(["recipe=kd_resnet56", "quant=asym", "nbits=2"])
    assert cfg.distill.kind == "kd" and cfg.distill.teacher == "resnet56"
    assert cfg.quant.clip == "mse" and cfg.quant.bn_recalibration  # on top of the strong recipe
    check_distill(cfg.distill)
    assert hydra_compose(["distill=kd"]).distill.teacher is None  # the default: the model itself


def test_teacher_resnet20_is_found_as_model_resnet20_finds_it(resnet, monkeypatch, tmp_path: Path) -> None:
    torch.manual_seed(2)
    own = resnet20()  # a ResNet-20 with other weights, as $COMPRESS_PRETRAINED
    torch.save({"state_dict": own.state_dict()}, tmp_path / "mine.th")
    monkeypatch.setenv("COMPRESS_PRETRAINED", str(tmp_path / "mine.th"))
    teacher = make_teacher(kd("resnet20"), resnet)
    assert torch.equal(teacher.model.linear.weight, own.linear.weight)
