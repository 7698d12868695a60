"""Where each model's published pretrained weights come from.

The four CIFAR-10 ResNets of Idelbayev's ``pytorch_resnet_cifar10`` are published under file
names carrying the first 8 hex digits of their sha256 (``torch.hub`` checks them on download).
``model=<arch>`` takes its weights, first found:

1. ``model.pretrained=...`` on the command line (a path or https URL);
2. ResNet-20 only: ``$COMPRESS_PRETRAINED`` (the file itself, as before the family existed);
3. ``<weights dir>/<published file name>`` if that file exists, the weights dir being
   ``$COMPRESS_WEIGHTS``, else the directory of ``$COMPRESS_PRETRAINED``;
4. the published https URL.

So a model never takes another model's file: ``$COMPRESS_PRETRAINED`` names ResNet-20's, and
a deeper model looks for its own file name beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

URL_BASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
PUBLISHED = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}


def weights_dir() -> Path | None:
    """``$COMPRESS_WEIGHTS``, else the directory of ``$COMPRESS_PRETRAINED``, else None."""
    if os.environ.get("COMPRESS_WEIGHTS"):
        return Path(os.environ["COMPRESS_WEIGHTS"]).expanduser()
    if os.environ.get("COMPRESS_PRETRAINED"):
        return Path(os.environ["COMPRESS_PRETRAINED"]).expanduser().parent
    return None


def published_weights(arch: str) -> str:
    """Where ``arch``'s published weights are taken from (rules 2-4 above): for ResNet-20
    ``$COMPRESS_PRETRAINED`` if set, else the local copy in :func:`weights_dir` if there is one,
    else their https URL; ``ValueError`` for an architecture without published weights."""
    if arch not in PUBLISHED:
        raise ValueError(f"no published weights for {arch!r}: use one of {', '.join(PUBLISHED)}")
    if arch == "resnet20" and os.environ.get("COMPRESS_PRETRAINED"):
        return os.environ["COMPRESS_PRETRAINED"]
    folder = weights_dir()
    local = folder / PUBLISHED[arch] if folder else None
    return str(local) if local and local.is_file() else URL_BASE + PUBLISHED[arch]
