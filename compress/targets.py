"""Building a config group from its ``_target_``, with one-line errors.

Methods (``prune``, ``quant``, ``distill``), the data module and the network are each built from a
Hydra ``_target_`` config. :func:`parameters` imports the target and tells which arguments it
takes (so a key it would not take is refused before building); :func:`build_target` instantiates
it, turning Hydra's wrapped exception into one ``ValueError`` line naming the config key.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split())


def parameters(target: object, key: str) -> tuple[type, dict[str, inspect.Parameter], bool]:
    """The class ``target`` names, its constructor's parameters, and whether it takes any
    keyword (``**kwargs``); ``ValueError`` naming ``key`` if it cannot be imported."""
    try:
        cls = get_class(str(target))
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for an unimportable name
        raise ValueError(f"{key}._target_={target!r} cannot be imported ({one_line(e)}): check it is on PYTHONPATH") from None
    params = dict(inspect.signature(cls).parameters)
    return cls, params, any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_target(cfg: Mapping[str, Any], key: str, passthrough: tuple[type[BaseException], ...] = (ValueError,)) -> Any:
    """``instantiate(cfg)`` (nested containers as plain lists and dicts); an error the target
    raised that is one of ``passthrough`` (its own one-line message) is raised as it is, any
    other as ``ValueError`` naming ``key``, the target and the cause."""
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, passthrough):
            raise cause from None
        raise ValueError(f"{key}._target_={cfg.get('_target_')!r} could not be built "
                         f"({type(cause or e).__name__}: {one_line(cause or e)})") from None
