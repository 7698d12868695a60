"""Knowledge distillation from the full-precision pretrained network (``distill=kd``).

While a stage fine-tunes the compressed student, a frozen copy of the pretrained network (the
teacher, full precision, eval mode) sees the same batch, and the loss becomes
``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)``, with ``*_T`` the softmax at
temperature ``T`` (Hinton et al. 2015; ``T^2`` keeps the gradient scale independent of ``T``).
The teacher is not a submodule of the LightningModule: it is not trained, not saved in
checkpoints and not switched to training mode. It costs one extra forward pass per step.

``distill.teacher`` picks another teacher: null (default) is the pretrained model being
compressed; a model name (``resnet56``, ...) is that model's published weights (found as
``model=<name>`` finds them); anything else is a checkpoint path or https URL (a published
``.th`` file or an earlier run's ``model.pt``), its ResNet depth read from its weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

import pytorch_lightning as pl
from omegaconf import OmegaConf

from compress.checkpoint import apply_checkpoint, is_url, load_checkpoint, source_id
from compress.layers import network
from compress.models.net import build_net
from compress.models.resnet import ARCHS, arch_of, build
from compress.models.weights import PUBLISHED, published_weights

KINDS = ("none", "kd")


def check_distill(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming a bad ``distill.*`` value and what is allowed."""
    if cfg.kind not in KINDS:
        raise ValueError(f"distill.kind={cfg.kind!r} is not allowed: use one of {', '.join(KINDS)}")
    if cfg.kind == "none":
        return
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not 0 <= cfg.alpha <= 1:
        raise ValueError(f"distill.alpha={cfg.alpha!r} is not allowed: use a number in [0, 1]")
    if isinstance(cfg.temperature, bool) or not isinstance(cfg.temperature, (int, float)) or cfg.temperature <= 0:
        raise ValueError(f"distill.temperature={cfg.temperature!r} is not allowed: use a number > 0")
    teacher = cfg.get("teacher")
    if teacher is not None and (not isinstance(teacher, str) or not teacher):
        raise ValueError(f"distill.teacher={teacher!r} is not allowed: use null (the pretrained model), "
                         f"a model name ({', '.join(PUBLISHED)}) or a checkpoint path or https URL")


def teacher_source(teacher: str) -> str:
    """Where ``distill.teacher``'s weights come from: a model name's published weights, else
    itself; ``FileNotFoundError`` naming what is allowed if it is neither a name, a URL nor a file."""
    if teacher in PUBLISHED:  # as model=<name> finds them
        return published_weights(teacher)
    if not is_url(teacher) and not Path(teacher).expanduser().is_file():
        raise FileNotFoundError(f"distill.teacher={teacher!r} is not allowed: give a model name "
                                f"({', '.join(PUBLISHED)}), a checkpoint file that exists or an https URL")
    return teacher


def teacher_id(cfg: DictConfig) -> str | None:
    """Identity of ``distill.teacher``'s weights for hashes (the URL or the file's sha256), or None."""
    teacher = cfg.get("teacher") if cfg.kind != "none" else None
    return None if teacher is None else source_id(teacher_source(teacher), "distill.teacher")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1),
                    log_target=True, reduction="batchmean") * t * t


class Teacher:
    """A frozen full-precision copy of ``model`` and the loss that blends it in."""

    def __init__(self, model: nn.Module, alpha: float, temperature: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def blend(self, x: torch.Tensor, logits: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """The distillation loss for a batch ``x`` on which the student gave ``logits`` and ``ce``."""
        if next(self.model.parameters()).device != x.device:
            self.model.to(x.device)
        with torch.no_grad():
            target = self.model(x)
        return (1 - self.alpha) * ce + self.alpha * kd_loss(logits, target, self.temperature)


def load_teacher(teacher: str) -> nn.Module:
    """The network ``distill.teacher`` names, with its weights: a CIFAR ResNet's (told by its
    parameter names), or any network an earlier run's ``model.pt`` records how to build;
    ``ValueError`` if it is neither."""
    source = teacher_source(teacher)
    ckpt = load_checkpoint(source, "distill.teacher")
    arch = arch_of(ckpt.state_dict)
    if arch in ARCHS:
        model = build(arch, ckpt.state_dict["linear.weight"].shape[0])
    elif isinstance((ckpt.meta or {}).get("net"), dict):
        model = build_net(ckpt.meta["net"], "distill.teacher")
    else:
        raise ValueError(f"distill.teacher={teacher!r} holds weights this tool cannot rebuild: give "
                         f"{', '.join(PUBLISHED)}, a checkpoint of one, or an earlier run's model.pt")
    apply_checkpoint(model, ckpt, source, "distill.teacher")
    return model


class DistillationCallback(pl.Callback):
    """Distil from a frozen full-precision teacher in every fine-tuning stage (``distill=kd``).

    Args:
        kind: its label in reports (``kd``).
        alpha: weight of the distillation term, in [0, 1].
        temperature: softmax temperature, > 0.
        teacher: null (the pretrained model being compressed, as loaded), a model name with
            published weights, or a checkpoint path / https URL.
    """

    def __init__(self, kind: str = "kd", alpha: float = 0.9, temperature: float = 4.0, teacher: str | None = None) -> None:
        check_distill(OmegaConf.create({"kind": "kd", "alpha": alpha, "temperature": temperature, "teacher": teacher}))
        self.kind, self.alpha, self.temperature, self.source = str(kind), float(alpha), float(temperature), teacher
        self.teacher: Teacher | None = None

    def prepare(self, model: nn.Module) -> None:
        """Take the teacher: a copy of ``model`` as loaded, or ``teacher``'s network, which must
        predict as many classes as ``model``."""
        net = model if self.source is None else load_teacher(self.source)
        if net is not model:
            ours, theirs = outputs(model), outputs(net)
            if ours != theirs:
                raise ValueError(f"distill.teacher={self.source!r} predicts {theirs} classes, the student {ours}: "
                                 "give a teacher trained on the same classes")
        self.teacher = Teacher(net, self.alpha, self.temperature)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is None:
            self.prepare(network(pl_module))
        pl_module.teacher = self.teacher

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.teacher = None


def outputs(model: nn.Module) -> int | None:
    """How many classes ``model`` predicts: the width of its last linear layer (None if it has none)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None
