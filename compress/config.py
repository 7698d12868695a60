"""Checks of a composed config that must fail before any data or weights are loaded."""

from __future__ import annotations

import hashlib
import inspect
import json
from importlib import resources
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from compress.checkpoint import source_id
from compress.data import check_test_split, resolve_eval_batch
from compress.distill import teacher_id
from compress.export import FP_DTYPES
from compress.loggers import check_loggers
from compress.methods import check_count
from compress.models.weights import published_weights
from compress.progress import check_progress
from compress.quant import check_nbits


def cpu_precision() -> str:
    """Lightning precision for CPU training: ``bf16-mixed`` where the CPU has native bf16
    (AVX-512 BF16 or AMX: about 2x the fp32 step rate on ResNet-20), else ``32-true``."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native else "32-true"


if not OmegaConf.has_resolver("cpu_precision"):
    OmegaConf.register_new_resolver("cpu_precision", cpu_precision)
if not OmegaConf.has_resolver("min"):
    OmegaConf.register_new_resolver("min", min)

DEFAULT_MODEL = "resnet20"


def model_tag(model: str) -> str:
    """What run and sweep dir names add to ``<name>`` for ``model``: nothing for ResNet-20
    (its dirs predate the model family), else ``-<model>``, so two models never share a dir."""
    return "" if model == DEFAULT_MODEL else f"-{model}"


if not OmegaConf.has_resolver("model_tag"):
    OmegaConf.register_new_resolver("model_tag", model_tag)
if not OmegaConf.has_resolver("published_weights"):
    OmegaConf.register_new_resolver("published_weights", published_weights)


MODEL_KEYS = ("name", "net", "pretrained")


def check_keys(group: str, given: object, allowed: list[str]) -> None:
    """``ValueError`` naming the first key of ``group`` that is not in ``allowed`` (a typo, or a
    ``+key=value`` that no code would read), listing those that are."""
    unknown = [k for k in (given or {}) if k not in allowed]
    if unknown:
        raise ValueError(f"{group}.{unknown[0]} is not an option of {group}: use one of {', '.join(allowed)}")


# The config groups of the compression methods: an option without a ``_target_`` (``none``) runs
# no method, and the key that names the option.
METHOD_GROUPS = {"prune": "method", "quant": "mode", "distill": "kind"}
# Top-level options that only feed a method's option (``quant.nbits: ${nbits}``): the group,
# and its options that read them.
FEEDS = {"nbits": ("quant", "sym|asym"), "ramp_epochs": ("prune", "iterative|global")}


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``conf/<group>/*.yaml``), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in (resources.files("compress.conf") / group).iterdir()
                  if p.name.endswith(".yaml"))


def no_effect(setting: str, group: str, choice: str, others: str | None = None) -> str:
    """The message for ``setting`` (``key=value``, or a key) that ``group=choice`` ignores: drop
    it, or choose one of ``others`` (default: the group's other options)."""
    others = others or "|".join(o for o in group_options(group) if o != choice)
    return f"{setting} has no effect with {group}={choice}: drop it or choose {group}={others}"


def refers_to(node: Any, key: str) -> bool:
    """Whether an unresolved plain config ``node`` holds an interpolation of the top-level ``key``."""
    if isinstance(node, Mapping):
        return any(refers_to(v, key) for v in node.values())
    if isinstance(node, list):
        return any(refers_to(v, key) for v in node)
    return isinstance(node, str) and "${" + key + "}" in node


def check_effect(cfg: DictConfig, overrides: Sequence[str], choices: Mapping[str, Any]) -> None:
    """``ValueError`` naming the first of a single run's command-line ``overrides`` that would
    change nothing but the run dir's name, with the fix: a top-level option of :data:`FEEDS` that
    no option of ``cfg`` reads (``nbits=3`` with ``quant=none``), or an option of a method group
    whose chosen option (``choices``: Hydra's) runs no method (``+prune.sparsity=0.5`` with
    ``prune=none``). Sweeps are not checked: they cross such options with every method on purpose."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for override in overrides:
        key, assigned, value = override.lstrip("+~").partition("=")
        group = key.split(".")[0]
        if not assigned or key in choices:
            continue
        if key in FEEDS and not refers_to(raw, key):
            group, readers = FEEDS[key]
            if choices.get(group) in readers.split("|"):  # read by the method, but set there as well
                raise ValueError(f"{key}={value} has no effect beside {group}.{key}={cfg[group].get(key)}: "
                                 f"drop one of them")
            raise ValueError(no_effect(f"{key}={value}", group, choices.get(group), readers))
        if "." in key and group in METHOD_GROUPS and "_target_" not in cfg[group]:
            raise ValueError(no_effect(f"{key}={value}", group, choices.get(group)))


def _arguments(cls: type, leave_out: tuple[str, ...] = ()) -> list[str]:
    return [n for n, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in leave_out]


def validate(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the first bad value in ``cfg`` and what is allowed: the
    settings of the run itself (the methods and the data check their own arguments when they
    are built)."""
    from compress.module import Classifier  # the LightningModule (imports the training stack)

    check_keys("model", cfg.model, list(MODEL_KEYS))
    check_keys("optim", cfg.optim, _arguments(Classifier, ("model", "teacher")))
    check_keys("trainer", {k: v for k, v in cfg.trainer.items() if k != "_target_"}, _arguments(pl.Trainer))
    check_nbits(cfg.nbits)
    check_progress(cfg.progress)
    check_loggers(cfg.get("logger"))
    if not isinstance(cfg.model.name, str) or not cfg.model.name or "/" in cfg.model.name:
        raise ValueError(f"model.name={cfg.model.name!r} is not allowed: use a short label for run dirs and reports")
    pretrained = cfg.model.pretrained
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
        raise ValueError(f"model.pretrained={pretrained!r} is not allowed: use a checkpoint path, an https URL, "
                         "or null (train from scratch)")
    check_count("trainer.max_epochs", cfg.trainer.max_epochs)
    resolve_eval_batch(cfg.data.get("eval_batch_size", "auto"), torch.device("cpu"))
    check_test_split(cfg.data.get("test_split", "all"))
    if cfg.export_fp_dtype not in FP_DTYPES:
        raise ValueError(f"export_fp_dtype={cfg.export_fp_dtype!r} is not allowed: use one of {', '.join(FP_DTYPES)}")


# Settings that change where things are kept, what is shown or whether a run is redone, not
# what it computes.
NOT_HASHED = ("stage_cache", "resume", "progress", "logger")
# Options added after runs were published, at the value that computes exactly what the code
# computed before they existed: left out of the hash there, so adding an option keeps finished
# runs valid (a new option must be added here with its neutral value). Dotted key -> value.
NEUTRAL: dict[str, object] = {
    "trainer.limit_train_batches": 1.0,
    "trainer.limit_val_batches": 1.0,
    "trainer.limit_test_batches": 1.0,
    "model.name": DEFAULT_MODEL,
    "distill.teacher": None,  # before "distill": a none with a null teacher is still neutral
    "distill": {"kind": "none"},
    "quant.granularity": "tensor",
    "quant.learn_range": False,
    "data.test_split": "all",
    "prune.layer_sparsity": None,
    "quant.layer_nbits": None,
    "quant.abits": None,
    # methods as configured callbacks, with their layer selection (null: the model's default)
    "prune._target_": "compress.prune.PruningCallback",
    "quant._target_": "compress.quant.QuantizationCallback",
    "distill._target_": "compress.distill.DistillationCallback",
    "prune.layers": {k: None for k in ("types", "include", "exclude", "keep_first", "keep_last")},
    "quant.layers": {k: None for k in ("types", "include", "exclude", "keep_first", "keep_last")},
    # what the data is (CIFAR-10's, the only data before data configs said it)
    "data.num_classes": 10,
    "data.mean": [0.485, 0.456, 0.406],
    "data.std": [0.229, 0.224, 0.225],
    "data.image_size": 32,
    # never binding in a published run: their most pruned layer keeps 0.16% of its weights
    "prune.min_density": 0.001,
    "prune.round_to": None,  # prune=channel: any channel count, as before the option
    "prune.layer_ratio": None,  # prune=channel: every layer its ratio
}
# Keys that repeat another key's value (an interpolation): left out of the hash where they
# still do, so they add nothing to it. Dotted key -> the key it repeats.
ECHOES = {"quant.nbits": "nbits"}


def _parent(c: dict, key: str) -> tuple[dict | None, str]:
    """The dict holding dotted ``key`` in ``c`` (None if there is none) and its last part."""
    *path, last = key.split(".")
    node = c
    for k in path:
        node = node.get(k) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def drop_neutral(c: dict) -> None:
    """Remove the keys of :data:`NEUTRAL` from the plain config ``c`` where they hold the
    neutral value, and those of :data:`ECHOES` where they repeat their key's value."""
    for key, value in NEUTRAL.items():
        node, last = _parent(c, key)
        if node is not None and last in node and node[last] == value:
            del node[last]
    for key, source in ECHOES.items():
        node, last = _parent(c, key)
        src, src_last = _parent(c, source)
        if node is not None and src is not None and last in node and node[last] == src.get(src_last):
            del node[last]


def digest(obj: object) -> str:
    """The first 16 hex digits of the sha256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


CIFAR10 = "compress.data.CIFAR10Data"


def hashed_config(cfg: DictConfig) -> dict:
    """The resolved config as hashes see it: the teacher's weights by content, no download flag
    nor CIFAR-10's root (the same md5-checked files anywhere; other data is known by its root),
    options at their neutral value left out."""
    c = OmegaConf.to_container(cfg, resolve=True)
    if (c.get("distill") or {}).get("teacher") is not None:
        c["distill"]["teacher"] = teacher_id(cfg.distill)
    same_anywhere = ("root", "download") if c["data"].get("_target_") == CIFAR10 else ("download",)
    c["data"] = {k: v for k, v in c["data"].items() if k not in same_anywhere}  # CIFAR-10 is md5-checked
    drop_neutral(c)
    return c


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config, with the weights' content in place of their path and
    without the data root: two runs with the same hash compute the same thing."""
    c = {k: v for k, v in hashed_config(cfg).items() if k not in NOT_HASHED}
    c["model"]["pretrained"] = None if cfg.model.pretrained is None else source_id(cfg.model.pretrained)
    return digest(c)
