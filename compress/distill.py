"""Knowledge distillation from the full-precision pretrained network (``distill=kd``).

While a stage fine-tunes the compressed student, a frozen copy of the pretrained network (the
teacher, full precision, eval mode) sees the same batch, and the loss becomes
``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)``, with ``*_T`` the softmax at
temperature ``T`` (Hinton et al. 2015; ``T^2`` keeps the gradient scale independent of ``T``).
The teacher is not a submodule of the LightningModule: it is not trained, not saved in
checkpoints and not switched to training mode. It costs one extra forward pass per step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

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


def make_teacher(cfg: DictConfig, pretrained: nn.Module) -> Teacher | None:
    """The teacher ``cfg.distill`` asks for (a copy of ``pretrained`` as it is now), or None."""
    if cfg.kind == "none":
        return None
    return Teacher(pretrained, cfg.alpha, cfg.temperature)
