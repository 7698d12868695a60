"""Any network from its ``_target_`` config: a torchvision or timm constructor, or a class of the user's own.

``model.net`` is instantiated with Hydra, so every constructor argument is configuration
(``model.net.num_classes=100``, ``model.net.inverted_residual_setting=...``); the resolved
config is recorded in ``model.pt`` and ``model.cpk`` so that ``compress.export.load`` rebuilds
the same network later. A class of one's own needs only to be importable (``PYTHONPATH``).
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from compress.targets import build_target


def build_net(cfg: Mapping[str, Any], key: str = "model.net") -> nn.Module:
    """The ``nn.Module`` that ``cfg`` (a ``_target_`` config) builds; ``ValueError`` in one line
    (naming ``key`` and the target) if it cannot be imported or built, or is not a module."""
    target = cfg.get("_target_") if isinstance(cfg, Mapping) else None
    if not isinstance(target, str) or not target:
        raise ValueError(f"{key} needs a _target_: the dotted path of a model constructor or class "
                         "(e.g. torchvision.models.mobilenet_v2, or mymodels.SmallCNN on PYTHONPATH)")
    try:
        net = build_target(cfg, key, ())
    except ValueError as e:
        raise ValueError(f"{e}: check the name is importable (PYTHONPATH) and its arguments") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"{key}._target_={target!r} built a {type(net).__name__}, not a torch nn.Module")
    return net
