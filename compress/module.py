"""The LightningModule (a cross-entropy classifier trained with SGD) and the callback that compiles it."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from compress.distill import Teacher
from compress.layers import network

SCHEDULES = ("cosine", "constant")


class Classifier(pl.LightningModule):
    """Wraps a plain ``nn.Module`` classifier; logs ``{train,val,test}/{loss,acc}``.

    Args:
        model: the network (a plain ResNet; compression callbacks parametrize it in place).
        lr: peak learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: L2 penalty (applied by SGD to every parameter).
        nesterov: Nesterov momentum.
        schedule: ``cosine`` (per step, from ``lr`` to 0 over the fit, after warm-up) or ``constant``.
        warmup_epochs: linear warm-up from 0 to ``lr`` over this many epochs (may be fractional).
        label_smoothing: cross-entropy label smoothing for training.
        teacher: distill from this frozen network while training (see :mod:`compress.distill`;
            ``distill=kd``'s callback sets it for each fit).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        schedule: str = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={schedule!r} is not allowed: use one of {', '.join(SCHEDULES)}")
        self.save_hyperparameters(ignore=["model", "teacher"])
        self.model = model
        self.teacher = teacher  # not an nn.Module: never trained, saved or put in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, smoothing: float = 0.0) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if split == "train" and self.teacher is not None:
            loss = self.teacher.blend(x, logits, loss)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({f"{split}/loss": loss, f"{split}/acc": acc}, on_step=False, on_epoch=True, batch_size=len(y),
                      sync_dist=True)  # epoch means over every DDP rank's shard
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train", self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                "lower optim.lr or check the input data"
            )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.tested = torch.zeros((), dtype=torch.int64, device=self.device)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.tested += len(batch[1])  # counted from the batches: any DataLoader works
        # Reported numbers are fp32 whatever the training precision: under bf16 autocast a
        # fake-quantized weight would be rounded again, off its exact code*scale+offset levels.
        with torch.autocast(batch[0].device.type, enabled=False):
            self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_epochs * total / max(1, self.trainer.max_epochs))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CompileNetwork(pl.Callback):
    """``torch.compile`` the wrapped network in place (``nn.Module.compile``), once.

    List it after the compression callbacks: their ``setup`` parametrizes the layers first, and
    the compiled graph is guarded on the module, so later changes (baking, a new parametrization)
    recompile instead of running stale code. Worth it on a GPU; on a CPU compiling takes longer
    than it saves on CIFAR-sized runs.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = network(pl_module)
        if getattr(net, "_compiled_call_impl", None) is None:  # set by nn.Module.compile
            net.compile()
