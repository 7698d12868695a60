"""Which layers a compression method touches: module types, names or ``re:`` patterns, exclusions.

A selection is configuration (``prune.layers``, ``quant.layers``), in the spirit of NNI's
``config_list`` (``op_types``, ``op_names_re``, ``exclude_op_names``) and torchao's
``FqnToConfig`` (names or ``re:`` patterns)::

    types: [Conv2d, Linear]       # torch.nn class names, or dotted paths of any nn.Module class
    include: [features.3, "re:features\\.1[0-9]\\..*"]   # null: every layer of those types
    exclude: ["re:.*downsample.*"]   # names or patterns left out
    keep_first: false             # leave the first selected layer (module order) out
    keep_last: false              # leave the last selected layer (module order) out

A name matches a layer's qualified name exactly; ``re:<pattern>`` must match all of it
(``re.fullmatch``). A key left ``null`` takes the model's default (:func:`model_default`; given
``types`` without ``include``, every layer of those types): a
network may say its own with a ``compress_layers`` attribute (``{"prune": {...}, "quant": {...}}``,
as the CIFAR ResNets do); any other network prunes every Conv/Linear weight and quantizes every
Conv/Linear weight but its first and last layer (the stem and the classifier stay full precision).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Mapping

from torch import nn
from torch.nn.utils import parametrize

GENERIC: dict[str, dict[str, Any]] = {
    "prune": {"types": ["Conv2d", "Linear"]},
    "quant": {"types": ["Conv2d", "Linear"], "keep_first": True, "keep_last": True},
    "channel": {"types": ["Conv2d", "Linear"], "keep_last": True},  # whose output channels may go
}


def module_type(name: str, key: str) -> type[nn.Module]:
    """The module class ``name`` means: a ``torch.nn`` class name (``Conv2d``) or a dotted
    path (``torchvision.ops.misc.Conv2dNormActivation``); ``ValueError`` naming ``key`` if not."""
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module) if module else nn, attr)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{key}={name!r} is not a module type: use a torch.nn class name (Conv2d, Linear, ...) "
                         "or the dotted path of an nn.Module class")
    return cls


def has_weight(module: nn.Module) -> bool:
    """Whether ``module`` has a ``weight`` parameter (plain, or under a parametrization)."""
    return parametrize.is_parametrized(module, "weight") or isinstance(module._parameters.get("weight"), nn.Parameter)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` equals one of ``patterns`` or fully matches one given as ``re:<regex>``."""
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else p == name for p in patterns)


def _strings(value: object, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key}={value!r} is not allowed: use a list of layer names or re: patterns")
    for v in value:
        if v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ValueError(f"{key}: {v!r} is not a valid regular expression ({e})") from None
    return tuple(value)


@dataclass(frozen=True)
class LayerSelection:
    """Layers of the given types, named by ``include`` (all if None), less ``exclude`` and,
    if asked, the first and last of them. Only modules with a ``weight`` parameter count."""

    types: tuple[str, ...] = ("Conv2d", "Linear")
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False
    key: str = "layers"  # the config key, for errors

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, key: str, default: LayerSelection | None = None) -> LayerSelection:
        """The selection ``cfg`` (``key``'s value) asks for, its null entries taken from ``default``;
        ``ValueError`` naming an unknown or bad entry."""
        base = replace(default or cls(), key=key)
        if cfg is None:
            return base
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{key}={cfg!r} is not allowed: use a map with types, include, exclude, keep_first, keep_last")
        names = [f.name for f in fields(cls) if f.name != "key"]
        unknown = [k for k in cfg if k not in names]
        if unknown:
            raise ValueError(f"{key}.{unknown[0]} is not a layer selection key: use {', '.join(names)}")
        given: dict[str, Any] = {}
        for k, v in cfg.items():
            if v is None:
                continue
            if k in ("keep_first", "keep_last"):
                if not isinstance(v, bool):
                    raise ValueError(f"{key}.{k}={v!r} is not allowed: use true or false")
                given[k] = v
            else:
                given[k] = _strings(v, f"{key}.{k}")
        for t in given.get("types", base.types):
            module_type(t, f"{key}.types")
        if "types" in given and "include" not in given:
            given["include"] = None  # the default's names are of the default's types
        return replace(base, **given)

    def candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every module of the selection's types that has a ``weight`` parameter, by name."""
        types = tuple(module_type(t, f"{self.key}.types") for t in self.types)
        return {n: m for n, m in model.named_modules() if n and isinstance(m, types) and has_weight(m)}

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The selected layers of ``model`` in module order; ``ValueError`` if an include or
        exclude entry matches none of the candidates, listing them."""
        found = self.candidates(model)
        for what, patterns in (("include", self.include or ()), ("exclude", self.exclude)):
            dead = [p for p in patterns if not any(matches(n, [p]) for n in found)]
            if dead:
                raise ValueError(f"{self.key}.{what}: {dead[0]!r} matches no {'/'.join(self.types)} layer of "
                                 f"{type(model).__name__}: use one of {', '.join(found) or '(none)'}")
        chosen = [n for n in found if (self.include is None or matches(n, self.include)) and not matches(n, self.exclude)]
        ends = ([next(iter(found))] if self.keep_first and found else []) + ([list(found)[-1]] if self.keep_last and found else [])
        return {n: found[n] for n in chosen if n not in ends}


def model_default(model: nn.Module, kind: str) -> LayerSelection:
    """The default selection of ``kind`` (``prune``, ``quant``, ``channel``) for ``model``: its own
    ``compress_layers[kind]`` if it has one, else :data:`GENERIC`."""
    own = getattr(model, "compress_layers", None) or {}
    return LayerSelection.from_config(own.get(kind, GENERIC[kind]), f"{kind} default")


def select_layers(model: nn.Module, kind: str, cfg: Mapping[str, Any] | None = None, key: str | None = None
                  ) -> dict[str, nn.Module]:
    """The layers of ``model`` that ``kind``'s selection ``cfg`` (null entries: the model's default)
    picks; errors name the config ``key`` (default ``<kind>.layers``)."""
    return LayerSelection.from_config(cfg, key or f"{kind}.layers", model_default(model, kind)).select(model)
