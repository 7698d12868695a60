"""CIFAR-10 held in memory as uint8 tensors, augmented a whole batch at a time.

Per-image PIL transforms and worker processes would fight the model for a 2-core CPU, so the
dataset is decoded once (``torchvision.datasets.CIFAR10``) into one ``uint8`` tensor; each
batch is cropped (4-pixel zero padding), flipped and normalized with tensor ops on whatever
device the data lives on (``data.device``: ``auto`` puts it on the trainer's device).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from torchvision.datasets import CIFAR10

# Normalization the published ResNet-20 checkpoint was trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


DOWNLOADS = ("auto", True, False)
TEST_SPLITS = ("all", "search", "report")
TEST_SPLIT_SEED = 0  # fixed, whatever the run's seed: every run and report uses the same halves


def check_test_split(split: object) -> str:
    """Return ``split`` if it is one of :data:`TEST_SPLITS`, else raise ``ValueError`` naming it."""
    if split not in TEST_SPLITS:
        raise ValueError(f"data.test_split={split!r} is not allowed: use one of {', '.join(TEST_SPLITS)}")
    return split  # type: ignore[return-value]


def split_mask(n: int, split: str) -> torch.Tensor:
    """Which of ``n`` test images (in file order) belong to ``split``: ``all``, or one of two
    seeded halves of them (``torch.randperm(n)`` with seed :data:`TEST_SPLIT_SEED`: its first
    ``n // 2`` entries are the ``search`` half, on which a search may select; the rest the
    ``report`` half, on which its choices are reported)."""
    keep = torch.ones(n, dtype=torch.bool)
    if check_test_split(split) != "all":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
        keep[order[: n // 2] if split == "report" else order[n // 2 :]] = False
    return keep


def default_root() -> Path:
    """Where CIFAR-10 is downloaded when no root is given: ``$XDG_CACHE_HOME/compress/cifar10``
    (``~/.cache/compress/cifar10``), next to torch.hub's cache of the weights."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "compress" / "cifar10"


def missing_file(root: Path) -> Path | None:
    """The first CIFAR-10 batch file that ``root`` (torchvision's layout) lacks, or None."""
    batches = root / "cifar-10-batches-py"
    needed = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return next((batches / n for n in needed if not (batches / n).is_file()), None)


def check_root(root: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``root`` holds CIFAR-10 in torchvision's layout."""
    missing = missing_file(root)
    if missing:
        raise FileNotFoundError(
            f"data.root={str(root)!r} does not hold CIFAR-10 (missing {missing}): "
            "point data.root or COMPRESS_DATA at a torchvision CIFAR10 root, or set data.download=true"
        )


def download(root: Path) -> None:
    """Fetch CIFAR-10 into ``root`` with torchvision (md5-checked); ``ValueError`` in one line if it fails."""
    try:
        for train in (True, False):
            CIFAR10(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a failed md5 check
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"could not download CIFAR-10 into {str(root)!r} ({reason}): offline, put the official "
            f"cifar-10-batches-py folder there, or set COMPRESS_DATA (or data.root) to a CIFAR-10 root"
        ) from None


def load_split(root: Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as ``uint8 [N, 3, 32, 32]`` and labels as ``int64 [N]``."""
    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision's MD5 check of the batch files failed
        raise ValueError(f"data.root={str(root)!r}: CIFAR-10 files are corrupt or incomplete ({e})") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float, normalized with the checkpoint's mean/std, channels-last."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255)
    out = (images.float() - mean) * inv_std
    return out.contiguous(memory_format=torch.channels_last)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` pixels, and random horizontal flip, per image.

    The random draws come from a CPU ``generator`` whatever the images' device, so the
    augmentation is the same on CPU and GPU for the same seed."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dev = images.device
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=generator).to(dev)
    flip = torch.rand(n, 1, 1, 1, generator=generator).to(dev) < 0.5
    rows = torch.arange(h, device=dev).view(1, 1, h, 1) + dy
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    idx_n = torch.arange(n, device=dev).view(n, 1, 1, 1)
    idx_c = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[idx_n, idx_c, rows, cols]


class EpochSeed:
    """Seeds epoch ``e``'s shuffle and augmentation with ``seed + e``.

    Exposed as the loader's ``sampler``: Lightning calls ``set_epoch`` on it at the start of
    every epoch (as for a ``DistributedSampler``), also after resuming from a checkpoint.
    """

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)


class TensorBatches:
    """Iterable of normalized ``(images, labels)`` batches over in-memory uint8 tensors.

    Training batches are shuffled, cropped and flipped (seeded by :class:`EpochSeed`), and the
    last partial batch is dropped; evaluation batches keep order and every image.
    ``rank``/``world_size`` shard the data for DDP.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size = rank, world_size
        self.sampler = EpochSeed(seed)
        self.batch_sampler = None  # Lightning reads it next to ``sampler``; batching is ours

    def __len__(self) -> int:
        n = len(self.labels[self.rank :: self.world_size])
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self.sampler.generator()
        n = len(self.labels)
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        order = order[self.rank :: self.world_size].to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = augment(x, gen)
            yield normalize(x), self.labels[idx]


def leading_images(trainer: pl.Trainer, n: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The images of the trainer's datamodule's first (augmented) training batches, on
    ``device``, whole batches until at least ``n`` were yielded: what a calibration pass runs on."""
    seen = 0
    for images, _ in trainer.datamodule.train_dataloader():
        if seen >= n:
            return
        yield images.to(device)
        seen += len(images)


def resolve_eval_batch(size: int | str, device: torch.device) -> int:
    """``eval_batch_size`` for data on ``device``: ``auto`` is 200 on a CPU (larger batches
    evaluate slower on 2 cores) and 2000 on a GPU (200 leaves it mostly idle)."""
    if size == "auto":
        return 200 if device.type == "cpu" else 2000
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    raise ValueError(f"data.eval_batch_size={size!r} is not allowed: use a positive integer or 'auto'")


class CIFAR10Data(pl.LightningDataModule):
    """CIFAR-10 with a seeded validation split carved out of the training set.

    Args:
        root: torchvision CIFAR-10 root (the config defaults it to ``$COMPRESS_DATA``); None:
            :func:`default_root`.
        download: fetch the dataset (with torchvision's md5 checks) if it is missing: ``True``,
            ``False``, or ``auto`` (only into the default root, when no root is given).
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test, or ``auto`` (see :func:`resolve_eval_batch`).
        val_size: images of the training set held out for validation (0: none).
        seed: seeds the split and the shuffling.
        device: where the dataset lives and is augmented: ``auto`` (the attached trainer's
            device, so ``trainer=gpu`` keeps the data on the GPU), ``cpu`` or ``cuda``.
        train_subset: use only the first N training images (0: all); for smoke runs.
        test_split: which test images to test on: ``all``, or the ``search`` or ``report``
            half (see :func:`split_mask`), so a search selects on one half and reports on the other.
    """

    def __init__(
        self,
        root: str | None = None,
        download: bool | str = "auto",
        batch_size: int = 128,
        eval_batch_size: int | str = "auto",
        val_size: int = 5000,
        seed: int = 0,
        device: str = "auto",
        train_subset: int = 0,
        test_split: str = "all",
    ) -> None:
        super().__init__()
        if download not in DOWNLOADS:
            raise ValueError(f"data.download={download!r} is not allowed: use auto, true or false")
        self.download = download is True or (download == "auto" and root is None)
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.seed, self.device, self.train_subset = val_size, seed, device, train_subset
        self.test_split = check_test_split(test_split)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check(self) -> None:
        """Download the data if it is missing and allowed, else fail early naming the root."""
        if self.download and missing_file(self.root):
            download(self.root)
        check_root(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.check()
        images, labels = load_split(self.root, train=True)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_subset:
            train_idx = train_idx[: self.train_subset]
        test_images, test_labels = load_split(self.root, train=False)
        test_idx = split_mask(len(test_labels), self.test_split)
        dev = self.trainer.strategy.root_device if self.device == "auto" and self.trainer else torch.device(
            "cpu" if self.device == "auto" else self.device)
        self.splits = {
            "train": (images[train_idx].to(dev), labels[train_idx].to(dev)),
            "val": (images[val_idx].to(dev), labels[val_idx].to(dev)),
            "test": (test_images[test_idx].to(dev), test_labels[test_idx].to(dev)),
        }

    def _batches(self, split: str, train: bool) -> TensorBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        images, labels = self.splits[split]
        bs = self.batch_size if train else resolve_eval_batch(self.eval_batch_size, images.device)
        return TensorBatches(images, labels, bs, train, self.seed, rank, world)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> TensorBatches | list:
        return self._batches("val", train=False) if self.val_size else []

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", train=False)
