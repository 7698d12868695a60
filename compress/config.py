"""Checks of a composed config that must fail before any data or weights are loaded."""

from __future__ import annotations

import hashlib
import json

import torch
from omegaconf import DictConfig, OmegaConf

from compress.actquant import check_abits
from compress.checkpoint import source_id
from compress.data import check_test_split, resolve_eval_batch
from compress.distill import check_distill, teacher_id
from compress.export import FP_DTYPES
from compress.loggers import check_loggers
from compress.layers import block_convs, prunable_layers
from compress.models import ARCHS, build
from compress.models.weights import published_weights
from compress.progress import check_progress
from compress.prune import check_layer_sparsity, check_sparsity
from compress.quant import MODES, check_clip, check_granularity, check_layer_nbits, check_learn_range, check_nbits

PRUNE_METHODS = ("none", "oneshot", "iterative", "global")


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


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer >= 0")
    return value


def validate(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the first bad value in ``cfg`` and what is allowed."""
    check_nbits(cfg.nbits)
    check_progress(cfg.progress)
    check_loggers(cfg.get("logger"))
    check_distill(cfg.distill)
    if cfg.model.name not in ARCHS:
        raise ValueError(f"model.name={cfg.model.name!r} is not allowed: use one of {', '.join(ARCHS)}")
    if cfg.quant.mode not in ("none", *MODES):
        raise ValueError(f"quant.mode={cfg.quant.mode!r} is not allowed: use one of none, {', '.join(MODES)}")
    if cfg.prune.method not in PRUNE_METHODS:
        raise ValueError(f"prune.method={cfg.prune.method!r} is not allowed: use one of {', '.join(PRUNE_METHODS)}")
    _count("trainer.max_epochs", cfg.trainer.max_epochs)
    resolve_eval_batch(cfg.data.eval_batch_size, torch.device("cpu"))
    check_test_split(cfg.data.test_split)
    if cfg.export_fp_dtype not in FP_DTYPES:
        raise ValueError(f"export_fp_dtype={cfg.export_fp_dtype!r} is not allowed: use one of {', '.join(FP_DTYPES)}")
    if cfg.quant.mode != "none":
        _count("quant.epochs", cfg.quant.epochs)
        _count("quant.bn_recalibration", cfg.quant.bn_recalibration)
        check_clip(cfg.quant.clip)
        check_granularity(cfg.quant.granularity)
        check_learn_range(cfg.quant.learn_range)
        check_layer_nbits(cfg.quant.layer_nbits, block_convs(build(cfg.model.name)))
        check_abits(cfg.quant.abits)
    if cfg.prune.method != "none":
        check_sparsity(cfg.prune.sparsity)
        check_layer_sparsity(cfg.prune.layer_sparsity, prunable_layers(build(cfg.model.name)))
        epochs = _count("prune.epochs", cfg.prune.epochs)
        ramp = _count("prune.ramp_epochs", cfg.prune.ramp_epochs)
        if ramp > epochs:
            raise ValueError(
                f"prune.ramp_epochs={ramp} is longer than prune.epochs={epochs}: the target sparsity "
                "would never be reached (lower ramp_epochs or raise trainer.max_epochs)"
            )
        if cfg.prune.method == "oneshot" and ramp != 0:
            raise ValueError(f"prune.ramp_epochs={ramp} is not allowed for prune=oneshot (it prunes once, at the start): "
                             "use prune=iterative for a ramp")
        if cfg.prune.method != "oneshot" and ramp == 0:
            raise ValueError(f"prune.ramp_epochs=0 is not allowed for prune={cfg.prune.method}: use prune=oneshot")


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
}


def drop_neutral(c: dict) -> None:
    """Remove the keys of :data:`NEUTRAL` from the plain config ``c`` where they hold the neutral value."""
    for key, value in NEUTRAL.items():
        *path, last = key.split(".")
        node = c
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and node[last] == value:
            del node[last]


def digest(obj: object) -> str:
    """The first 16 hex digits of the sha256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def hashed_config(cfg: DictConfig) -> dict:
    """The resolved config as hashes see it: the teacher's weights by content, no data root or
    download flag, options at their neutral value left out."""
    c = OmegaConf.to_container(cfg, resolve=True)
    if (c.get("distill") or {}).get("teacher") is not None:
        c["distill"]["teacher"] = teacher_id(cfg.distill)
    c["data"] = {k: v for k, v in c["data"].items() if k not in ("root", "download")}
    drop_neutral(c)
    return c


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config, with the weights' content in place of their path and
    without the data root: two runs with the same hash compute the same thing."""
    c = {k: v for k, v in hashed_config(cfg).items() if k not in NOT_HASHED}
    c["model"]["pretrained"] = source_id(cfg.model.pretrained)
    return digest(c)
