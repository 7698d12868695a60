"""Models: the CIFAR-10 ResNet family (ResNet-20/32/44/56)."""

from compress.models.resnet import ARCHS, BasicBlock, ResNet, arch_of, build, resnet20, resnet32, resnet44, resnet56

__all__ = ["ARCHS", "BasicBlock", "ResNet", "arch_of", "build", "resnet20", "resnet32", "resnet44", "resnet56"]
