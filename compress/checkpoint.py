"""Reading pretrained weights and writing/reading compressed checkpoints.

Two formats load: the published ``pytorch_resnet_cifar10`` file (``{"state_dict": ...}`` with
``module.`` prefixes) and this project's own checkpoint, which adds the pruning masks and
what the weights were quantized with, so a later run can start from a pruned model and keep
its zeros. ``https://`` sources go through ``torch.hub`` with its hash check (the file name
carries the sha256 prefix, as ``resnet20-12fca82f.th`` does).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.models import arch_of
from compress.resize import resize_to

FORMAT = "compress-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """Weights of a plain model, plus masks (True = kept) and free-form metadata."""

    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def is_url(source: str) -> bool:
    return source.startswith("https://")


def source_id(source: str, key: str = "model.pretrained") -> str:
    """Identity of a weights source for cache keys: the URL, or the sha256 of a local file
    (errors name the config ``key`` that gave it)."""
    if is_url(source):
        return source
    return "sha256:" + hashlib.sha256(_local(source, key).read_bytes()).hexdigest()


def _local(source: str, key: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={source!r}: no such file (give a checkpoint path or an https URL)")
    return path


def _read(source: str, key: str) -> Any:
    if is_url(source):
        try:
            return torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=True, weights_only=True)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a hash mismatch
            raise ValueError(
                f"{key}={source!r} could not be downloaded and verified ({type(e).__name__}: {e}); "
                f"offline, point {key} at a local copy, or COMPRESS_WEIGHTS at a directory holding the "
                "published files (ResNet-20: also COMPRESS_PRETRAINED at its file)"
            ) from None
    path = _local(source, key)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file; its messages run over many lines
        raise ValueError(
            f"{key}={source!r} is not a checkpoint this tool can read ({type(e).__name__}): give a "
            "state_dict saved with torch.save, a model.pt of an earlier run, or a published .th file"
        ) from None


def load_checkpoint(source: str, key: str = "model.pretrained") -> Checkpoint:
    """Read a checkpoint from a local path or URL, in either supported format, or a packed
    ``model.cpk`` artifact (errors name the config ``key`` that gave ``source``)."""
    if not is_url(source) and _local(source, key).read_bytes()[:4] == ARTIFACT_MAGIC:
        return _from_artifact(source, key)
    obj = _read(source, key)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{key}={source!r} holds no 'state_dict': not a model checkpoint")
    sd = {k.removeprefix("module."): v for k, v in obj["state_dict"].items()}
    if obj.get("format") == FORMAT and obj.get("version") != VERSION:
        raise ValueError(f"{key}={source!r} is format version {obj.get('version')}, this code reads {VERSION}")
    return Checkpoint(sd, dict(obj.get("masks", {})), dict(obj.get("meta", {})))


ARTIFACT_MAGIC = b"CMPK"  # compress.export.MAGIC (not imported: the export package imports this module)


def _from_artifact(source: str, key: str) -> Checkpoint:
    """The weights of a ``model.cpk`` as a checkpoint (:func:`compress.export.artifact.checkpoint_of`)."""
    from compress.export.artifact import checkpoint_of

    try:
        return checkpoint_of(source)
    except ValueError as e:
        raise ValueError(f"{key}={source!r}: {e}") from None


def apply_checkpoint(model: nn.Module, ckpt: Checkpoint, source: str, key: str = "model.pretrained") -> None:
    """Load ``ckpt`` into ``model`` strictly, with an error naming what does not match (and the
    config ``key`` that gave ``source``); a channel-pruned checkpoint (``meta["resized"]``)
    first gives ``model`` its layer widths."""
    if (ckpt.meta or {}).get("resized"):
        resize_to(model, ckpt.state_dict)
    own, want, found = model.state_dict(), getattr(model, "arch", type(model).__name__), arch_of(ckpt.state_dict)
    if found and found != want:
        raise ValueError(f"{key}={source!r} holds {found} weights, not {want}'s: "
                         f"give the weights of {want} (or choose model={found})")
    # shapes first: load_state_dict raises a bare RuntimeError on them even with strict=False
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ckpt.state_dict.items()
              if k in own and own[k].shape != v.shape]
    what = f"{key}={source!r} does not match {want}"
    if shapes:
        raise ValueError(f"{what}: wrong shape {shapes[:3]}")
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")


def save_checkpoint(path: Path, model: nn.Module, masks: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a plain model's weights, masks and metadata atomically (temp file + rename)."""
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "masks": {k: v.cpu() for k, v in masks.items()},
        "meta": meta,
    }
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it into place, readable
    by everyone (0644 less the umask; ``mkstemp`` alone leaves 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o644 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
