"""Hydra entry point: ``python -m compress.train prune=global quant=asym nbits=4``.

Loads the pretrained model, runs the stages the config asks for (see ``compress.stages``),
saves the final plain model with its masks (``model.pt``) and its packed artifact
(``model.cpk``, see ``compress.export``), and writes ``metrics.json`` last,
atomically: a run dir without it is unfinished. A run whose ``metrics.json`` already holds the
same config hash is skipped (``resume=true``), so a re-launched sweep only does what is missing.
A mistake on the command line is one line ``error: ...`` naming the fix, exit status 2, and no
run dir (:func:`main`; an option the chosen methods ignore too: :func:`compress.config.check_effect`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.utilities import rank_zero_only

import pytorch_lightning as pl
from torch import nn

from compress.checkpoint import Checkpoint, apply_checkpoint, atomic_write, load_checkpoint, save_checkpoint, source_id
from compress.config import METHOD_GROUPS, NOT_HASHED, check_effect, config_hash, no_effect, validate
from compress.export import save as save_artifact
from compress.inputs import build_data, check_outputs, describe
from compress.interrupt import Interrupted, stop_on_signals
from compress.methods import Method, build
from compress.models.net import build_net
from compress.progress import duration
from compress.resize import resize_to
from compress import sensitivity
from compress.stages import run_stages
from compress.stats import distinct_values, distinct_values_per_channel, sparsity
from compress.targets import one_line

log = logging.getLogger("compress")

# What a user's mistake (or the machine's: a full disk, a dir it may not write) raises: reported
# as one line and a non-zero exit, not a traceback. Results are written atomically, so none is
# left half-written.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
FULL_ERROR = "HYDRA_FULL_ERROR"  # "1": Hydra raises its errors instead of printing them
_raising_hydra_errors = False  # main() set it, until the job starts
# Hydra plugins' config groups, by what installs them (the extras of pyproject.toml).
PLUGINS = {"hydra/launcher/joblib": ("hydra-joblib-launcher", "launchers"),
           "hydra/launcher/submitit_local": ("hydra-submitit-launcher", "launchers"),
           "hydra/launcher/submitit_slurm": ("hydra-submitit-launcher", "launchers"),
           "hydra/sweeper/optuna": ("hydra-optuna-sweeper", "search")}  # hparams_search's sweeper


def hardware(accelerator: str = "auto") -> dict[str, Any]:
    """What ran the job: accelerator, device name, CPU threads, torch version."""
    gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if gpu else f"CPU {platform.machine()}"
    return {"accelerator": "gpu" if gpu else "cpu", "device": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def finished_result(path: Path) -> dict[str, Any] | None:
    """The complete metrics file at ``path`` (None if there is none or it is unreadable)."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("config_hash") else None


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain configs (a key only one has counts)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix.rstrip(".") or "(config)"] if old != new else []
    return [k for key in sorted(set(old) | set(new), key=str) if key not in NOT_HASHED
            for k in differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")]


def start(cfg: DictConfig, result: Path) -> str | None:
    """Validate ``cfg`` and return its hash; None (and a log line) if ``cfg.resume`` is set and
    ``result`` is already this config's finished result, so the job has nothing to do.
    ``ValueError`` if ``result`` is the finished result of another configuration: it is never
    overwritten (the message names the keys that differ)."""
    validate(cfg)
    digest = config_hash(cfg)
    previous = finished_result(result)
    if previous is not None and previous["config_hash"] != digest:
        keys = differing_keys(previous.get("config"), OmegaConf.to_container(cfg, resolve=True))
        what = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") if keys else "the weights' or data's content"
        raise ValueError(f"{result.parent} holds the finished result of another configuration (differs in {what}); "
                         "it is kept: choose another dir (hydra.run.dir=..., or name=...) or move that one away")
    if cfg.resume and previous is not None:
        log.info("already finished, skipping: %s", result)
        return None
    return digest


def build_methods(cfg: DictConfig) -> tuple[list[Method], list[pl.Callback]]:
    """The compression methods ``prune`` and ``quant`` configure (those with a ``_target_``, in
    that order), and the callbacks of every stage (``distill``'s); each checks its own arguments."""
    methods = [build(cfg[g], g) for g in ("prune", "quant") if "_target_" in cfg[g]]
    extra = [build(cfg.distill, "distill")] if "_target_" in cfg.distill else []
    return methods, extra


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """Run one configured job into ``out_dir``; returns its metrics (None if skipped, or on a
    DDP rank other than 0)."""
    t0 = time.time()
    metrics_path = out_dir / "metrics.json"
    digest = start(cfg, metrics_path)
    if digest is None:
        return None
    if not cfg.resume:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    methods, extra = build_methods(cfg)
    datamodule = build_data(cfg.data)
    data = describe(datamodule, cfg.data)
    model = build_net(cfg.model.net)
    check_outputs(model, data)
    ckpt = Checkpoint({}) if cfg.model.pretrained is None else load_checkpoint(cfg.model.pretrained)
    if cfg.model.pretrained is not None:
        apply_checkpoint(model, ckpt, cfg.model.pretrained)
    for method in [*methods, *extra]:
        method.prepare(model)
    torch.set_float32_matmul_precision("high")

    pretrained_id = "none" if cfg.model.pretrained is None else source_id(cfg.model.pretrained)
    results, masks = run_stages(cfg, model, ckpt.masks, datamodule, out_dir, pretrained_id, methods, extra)
    if rank_zero_only.rank != 0:  # DDP: the other ranks computed the same model; rank 0 writes it
        return None
    records = {m.stage: m.record(model) for m in methods}
    resized = bool(resize_to(build_net(cfg.model.net), model.state_dict()))  # channel-pruned: narrower layers
    meta = {"quant": records.get("quant"), "net": OmegaConf.to_container(cfg.model.net, resolve=True), "data": data,
            **({"resized": True} if resized else {}), "config": OmegaConf.to_yaml(cfg, resolve=True)}
    save_checkpoint(out_dir / "model.pt", model, masks, meta)
    try:
        metrics = finish(cfg, digest, model, masks, methods, records, results, meta, out_dir, t0)
    except (ValueError, RuntimeError, OSError) as e:
        raise LateError(f"the trained model is saved in {out_dir / 'model.pt'}, but writing its results failed "
                        f"({type(e).__name__}: {' '.join(str(e).split())}); python -m compress.export {out_dir} "
                        "packs it once that is fixed") from e
    log.info("done in %s: test acc %.4f (before fine-tuning %.4f); results in %s", duration(metrics["wall_time_s"]),
             metrics["test_acc"], results[-1].before["acc"], out_dir)
    return metrics


class LateError(ValueError):
    """A failure after the model was trained and saved: the message says where it is."""


def finish(cfg: DictConfig, digest: str, model: nn.Module, masks: dict[str, torch.Tensor], methods: list[Method],
           records: dict[str, Any], results: list[Any], meta: dict[str, Any], out_dir: Path, t0: float) -> dict[str, Any]:
    """Write ``model.cpk`` and, last and atomically, ``metrics.json`` of a finished run; its metrics."""
    size = save_artifact(Checkpoint(model.state_dict(), masks, meta), out_dir / "model.cpk",
                         cfg.export_fp_dtype)
    final = results[-1]
    quantized = "quant" in records
    distinct = distinct_values(model) if quantized else {}
    per_channel = distinct_values_per_channel(model) if quantized else {}
    quant = next((m for m in methods if m.stage == "quant"), None)
    choices = {"prune": "none", "quant": "none", "nbits": None, "abits": None, "granularity": None}
    for m in methods:
        choices |= m.choices()
    metrics = {
        "config_hash": digest,
        "choices": {**choices, "name": cfg.name, "seed": cfg.seed, "model": cfg.model.name},
        "before_ft": final.before,
        "after_ft": final.after,
        "test_acc": (final.after or final.before)["acc"],
        "test_loss": (final.after or final.before)["loss"],
        "test_images": (final.after or final.before).get("images"),  # None: a cached stage from before the field
        "sparsity": sparsity(model),
        "layer_sparsity": (records.get("prune") or {}).get("layer_sparsity", {}),  # target per layer (null: global threshold)
        "layer_nbits": quant.widths(model) if quant else {},
        "quantized_tensors": len(distinct),
        "max_distinct_values": max(distinct.values(), default=None),
        "distinct_values": distinct,
        "max_distinct_values_per_channel": max(per_channel.values(), default=None),
        "distinct_values_per_channel": per_channel,
        **{k: size[k] for k in ("fp32_bytes", "compressed_bytes", "ratio", "bits_per_weight")},
        "size": size,
        "methods": {stage: {k: v for k, v in r.items() if k != "grids"} for stage, r in records.items()},
        "data": meta["data"],
        "stages": [vars(r) for r in results],
        "wall_time_s": time.time() - t0 + sum(r.resumed_s for r in results if not r.cached),  # + interrupted runs
        "hardware": hardware(cfg.trainer.accelerator),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write(out_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # stale ones of other configs, if any
    return metrics


def objectives(out_dir: Path) -> tuple[float, int] | None:
    """What a search optimizes, from the run's ``metrics.json``: ``(test_acc, compressed_bytes)``
    (to maximize and to minimize); None where there is none (a sensitivity sweep, a failed run)."""
    try:
        m = json.loads((out_dir / "metrics.json").read_text())
        return float(m["test_acc"]), int(m["compressed_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@hydra.main(version_base="1.3", config_path="pkg://compress.conf", config_name="config")
def app(cfg: DictConfig) -> tuple[float, int] | None:
    """Hydra task: run one job (a sensitivity sweep where the config has ``sensitivity``),
    turning a user error into one line and exit status 2; returns the run's :func:`objectives`
    (what ``hparams_search`` sweeps optimize). A single run also refuses an option of its
    command line that would change nothing (:func:`compress.config.check_effect`).

    In a multirun the error is re-raised instead, so Hydra marks this job failed and runs the
    others (its launcher reports the failure when the sweep ends; the exit status is then 1).
    """
    if _raising_hydra_errors:  # composed: Hydra reports what fails from here on, as it does by default
        os.environ.pop(FULL_ERROR, None)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning.utilities._pytree")
    # A resumed stage writes its checkpoints where the interrupted one did, on purpose; tiny
    # budgets have fewer batches than the logging interval.
    warnings.filterwarnings("ignore", message=".*(exists and is not empty|smaller than the logging interval).*")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        if not multirun:
            check_effect(cfg, HydraConfig.get().overrides.task, HydraConfig.get().runtime.choices)
        with stop_on_signals():
            (sensitivity.run if "sensitivity" in cfg else run)(cfg, out_dir)
    except Interrupted as e:
        log.debug("interrupted", exc_info=True)
        print(f"error: {e.message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        log.debug("failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        if multirun:  # the sweep's report lists the run as missing, from its .hydra/ config
            raise
        discard_failed(out_dir)
        sys.exit(2)
    return objectives(out_dir)


def discard_failed(out_dir: Path) -> None:
    """Remove the run dir of a single run that failed before it had anything to keep (no
    metrics.json, no trained model.pt, no checkpoint to resume from), so no empty run dir is left behind."""
    keep = [out_dir / "metrics.json", out_dir / "model.pt"]
    if not any(p.exists() for p in keep) and not any((out_dir / "checkpoints").glob("*/last.ckpt")):
        logging.shutdown()  # closes train.log
        shutil.rmtree(out_dir, ignore_errors=True)


def command_line_error(e: CompactHydraException) -> str:
    """What Hydra's error ``e`` about the command line means, in one line with the fix: an option
    that is not in the config (the valid ones, where Hydra would suggest ``+key=``), a config
    group option that does not exist (the existing ones) or whose plugin is not installed
    (the ``pip install`` of its extra); any other of Hydra's messages joined into one line."""
    cause = e.__cause__
    if isinstance(e, MissingConfigException) and e.missing_cfg_file in PLUGINS:
        package, extra = PLUGINS[e.missing_cfg_file]
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f'{group}={name} needs the {package} plugin, which is not installed: pip install -e ".[{extra}]"'
    if isinstance(e, MissingConfigException) and e.options:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        return f"{group}={name} is not an option of {group}: use one of {', '.join(e.options)}"
    parent = getattr(cause, "parent_node", None)
    if isinstance(cause, OmegaConfBaseException) and "not in struct" in str(cause) and isinstance(parent, DictConfig):
        key = str(cause.full_key)
        group = key.rpartition(".")[0]
        if group in METHOD_GROUPS and "_target_" not in parent:  # e.g. prune=none
            return no_effect(key, group, parent.get(METHOD_GROUPS[group]))
        valid = [k for k in parent if k not in ("_target_", "hydra")]
        if valid:
            return f"{key} is not an option{f' of {group}' if group else ''}: use one of {', '.join(valid)}"
    first = str(e).split("\n\n")[0]  # MissingConfigException: the search path follows
    reason = f" ({str(cause).splitlines()[0]})" if isinstance(cause, OmegaConfBaseException) else ""
    return one_line(first) + reason


def main() -> None:
    """The command line (``python -m compress.train``, ``compress-train``): :func:`app`, with
    Hydra's errors about the command line, which it finds while composing the config, as one
    line naming the fix and exit status 2 (:func:`command_line_error`; with ``HYDRA_FULL_ERROR=1``
    set, Hydra's own report)."""
    global _raising_hydra_errors
    if os.environ.get(FULL_ERROR) == "1":
        app()
        return
    os.environ[FULL_ERROR], _raising_hydra_errors = "1", True
    try:
        app()
    except CompactHydraException as e:
        print(f"error: {command_line_error(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop(FULL_ERROR, None)
        _raising_hydra_errors = False


if __name__ == "__main__":
    main()
