"""Models: ResNet-20 for CIFAR-10."""

from compress.models.resnet import BasicBlock, ResNet, resnet20

__all__ = ["BasicBlock", "ResNet", "resnet20"]
