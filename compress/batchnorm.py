"""Re-estimating BatchNorm statistics after the weights were compressed.

Quantizing the weights shifts every layer's output distribution, but the BatchNorm layers
still normalize with the running statistics of the FP model. At 3 bits per-tensor this
mismatch, not the rounding itself, costs most of the accuracy; re-estimating the statistics
on a few thousand (augmented) training images recovers most of it without any training.
Lightning has no callback for it, and ``torch.optim.swa_utils.update_bn`` expects a loader of
plain batches on the model's device and knows nothing of DDP; this callback uses the
datamodule's training batches and averages the statistics over DDP ranks.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from compress.data import leading_images
from compress.layers import network


class BatchNormRecalibration(pl.Callback):
    """Before the stage's first test or fit, recompute every BatchNorm's running mean/variance
    from ``images`` training images (the datamodule's augmented training batches), as a
    cumulative average over batches; the weights are not touched.

    Register it after the compression callbacks, so it sees the compressed weights.

    Args:
        images: how many training images to use (whole batches, at least this many); > 0.
    """

    def __init__(self, images: int) -> None:
        if isinstance(images, bool) or not isinstance(images, int) or images <= 0:
            raise ValueError(f"quant.bn_recalibration={images!r} is not allowed: use an integer > 0 (0 disables it)")
        self.images, self.done = images, False

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recalibrate(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recalibrate(trainer, pl_module)

    @torch.no_grad()
    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset and re-estimate the statistics (once per callback)."""
        if self.done:
            return
        model = network(pl_module)
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
        momenta = [m.momentum for m in norms]
        was_training = model.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
        model.train()
        for images in leading_images(trainer, self.images, pl_module.device):
            model(images)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
            m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
        model.train(was_training)
        self.done = True
