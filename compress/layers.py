"""Which layers get compressed, and baking their parametrizations into plain weights.

Pruning masks and fake quantization are both ``torch.nn.utils.parametrize`` parametrizations
of ``module.weight``; when both are present the mask comes first, so the quantizer sees the
masked tensor. :func:`bake` turns every parametrized weight back into a plain parameter
holding the values the model computed with, and keeps a quantizer's grid beside it
(:func:`baked_grid`): which ``(scale, offset)`` the baked values are ``code * scale + offset`` of.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.selection import matches, select_layers

P = TypeVar("P", bound=nn.Module)
T = TypeVar("T")
GRID_ATTR = "baked_weight_grid"  # where bake keeps a quantized module's (scale, offset)


class Quantizer(nn.Module):
    """A weight parametrization onto an integer grid: its forward gives ``code * scale + offset``
    (exact zeros kept zero), with the ``(scale, offset)`` that :meth:`grid` returns for its input."""

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(scale, offset)`` the forward of ``w`` uses: scalars, or per output channel."""
        raise NotImplementedError


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers pruning acts on by default, by qualified name: the model's default
    ``prune`` selection (every convolution and linear layer unless the model says otherwise)."""
    return select_layers(model, "prune")


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers quantization acts on by default: the model's default ``quant`` selection (for
    the CIFAR ResNets the residual blocks' convolutions; stem and classifier stay full precision)."""
    return select_layers(model, "quant")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` that carry a quantizer, installed or baked (see :func:`bake`)."""
    return {n: m for n, m in model.named_modules()
            if weight_parametrization(m, Quantizer) is not None or baked_grid(m) is not None}


def check_layer_map(key: str, mapping: object, layers: Iterable[str], check: Callable[[object, str], T]) -> dict[str, T]:
    """A per-layer setting (``key``, e.g. ``quant.layer_nbits``) as ``{layer name: value}``:
    each key a layer name or an ``re:`` pattern (all the layers it fully matches; later entries
    win), each value passed through ``check(value, its dotted key)``. ``ValueError`` for a key
    that matches none of ``layers`` (listing them) or a map that is not one."""
    if mapping is None:
        return {}
    valid = list(layers)
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{key}={mapping!r} is not allowed: use a map of layer name (or re: pattern) to value, "
                         f"e.g. {key}={{{valid[0] if valid else 'layer'}:...}}")
    out: dict[str, T] = {}
    for pattern, value in mapping.items():
        hits = [n for n in valid if matches(n, [str(pattern)])]
        if not hits:
            raise ValueError(f"{key} names unknown layer {str(pattern)!r}: use one of {', '.join(valid)}")
        checked = check(value, f"{key}.{pattern}")
        out |= {n: checked for n in hits}
    return out


def network(pl_module: nn.Module) -> nn.Module:
    """The network a callback acts on: ``pl_module.model`` when the LightningModule wraps one
    there (as :class:`compress.module.Classifier` does), else the module itself. Layer names
    are relative to it, so masks match the plain model's ``state_dict`` names."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


def weight_parametrization(module: nn.Module, kind: type[P]) -> P | None:
    """The parametrization of type ``kind`` on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, kind)), None)


def with_parametrization(model: nn.Module, kind: type[P]) -> dict[str, P]:
    """Every ``kind`` parametrization in ``model``, by the qualified name of its module."""
    found = {n: weight_parametrization(m, kind) for n, m in model.named_modules()}
    return {n: p for n, p in found.items() if p is not None}


def bake(model: nn.Module) -> None:
    """Replace every parametrized weight by a plain parameter holding its current value; where
    a :class:`Quantizer` made it, keep its grid for :func:`baked_grid`."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight"):
            with torch.no_grad():
                w = m.parametrizations.weight.original
                for p in m.parametrizations.weight:
                    if isinstance(p, Quantizer):
                        setattr(m, GRID_ATTR, tuple(t.clone() for t in p.grid(w)))
                    w = p(w)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def baked_grid(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(scale, offset)`` of the quantizer :func:`bake` removed from ``module``, if any."""
    return getattr(module, GRID_ATTR, None)
