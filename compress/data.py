"""Datasets held in memory as uint8 tensors, augmented a whole batch at a time.

Per-image PIL transforms and worker processes would fight the model for a 2-core CPU, so a
dataset is decoded once into one ``uint8 [N, 3, S, S]`` tensor; each training batch is
cropped (zero padding, 4 pixels at 32x32), flipped and normalized with tensor ops on whatever
device the data lives on (``data.device``: ``auto`` puts it on the trainer's device).

- :class:`CIFAR10Data` (``data=cifar10``) and :class:`CIFAR100Data` (``data=cifar100``): the
  torchvision pickle files (``cifar-10-batches-py/``, ``cifar-100-python/``).
- :class:`ImageFolderData` (``data=imagefolder``): ``<root>/train/<class>/*.png|jpg`` and
  ``<root>/test/<class>/*`` (torchvision's ImageFolder layout), resized to ``image_size``.

Each one says what it holds: ``num_classes``, ``mean``/``std`` (normalization, 0..1 scale) and
``image_size``; :func:`describe` reads them off any datamodule. The rest of the pipeline also
takes a user's ``LightningDataModule`` with ordinary DataLoaders (:func:`leading_images`).
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.trainer.states import TrainerFn
from torchvision.datasets import CIFAR10, CIFAR100

# Normalization the published ResNet-20 checkpoint was trained with (CIFAR-10's defaults).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# CIFAR-100's training-set statistics, the usual normalization for it.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DOWNLOADS = ("auto", True, False)
TEST_SPLITS = ("all", "search", "report")
TEST_SPLIT_SEED = 0  # fixed, whatever the run's seed: every run and report uses the same halves
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DESCRIBED = ("num_classes", "mean", "std", "image_size")


CIFAR10_TARGET = "compress.data.CIFAR10Data"  # a data config's _target_ for CIFAR-10


def is_cifar10(data_cfg: Mapping[str, Any] | None) -> bool:
    """Whether a run's data config is CIFAR-10 as the official test batch holds it: none at all
    (older checkpoints), or a ``_target_`` of :data:`CIFAR10_TARGET` (or none: a checkpoint's bare
    ``meta["data"]``) with, where it says them, 10 classes and 32 x 32 images."""
    if not data_cfg:
        return True
    if data_cfg.get("_target_", CIFAR10_TARGET) != CIFAR10_TARGET:
        return False
    size = data_cfg.get("image_size") or 32
    return (data_cfg.get("num_classes") or 10) == 10 and size in (32, [32, 32], (32, 32))


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


def check_stats(name: str, values: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    """``data.mean``/``data.std`` as 3 floats (R, G, B; 0..1 scale; a std > 0); None: ``default``."""
    if values is None:
        return tuple(default)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or (name.endswith("std") and min(out) <= 0) or not all(map(math.isfinite, out)):
        raise ValueError(f"{name}={values!r} is not allowed: use 3 numbers (R, G, B, on a 0..1 scale"
                         f"{', each > 0' if name.endswith('std') else ''})")
    return out


def check_positive(name: str, value: object) -> int:
    """``value`` if it is an integer > 0, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: use an integer > 0")
    return value


def resolve_val_size(val_size: int | float, n: int) -> int:
    """How many of ``n`` training images ``data.val_size`` holds out: a count (0: none) or a
    fraction in [0, 1); at least one image must be left to train on."""
    if isinstance(val_size, float) and 0 <= val_size < 1:
        count = round(val_size * n)
    elif isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0:
        count = val_size
    else:
        raise ValueError(f"data.val_size={val_size!r} is not allowed: use a count >= 0 or a fraction in [0, 1)")
    if count >= n:
        raise ValueError(f"data.val_size={val_size!r} leaves none of the {n} training images to train on")
    return count


# --- CIFAR-10 / CIFAR-100 files --------------------------------------------------------------


@dataclass(frozen=True)
class CifarFormat:
    """Where torchvision keeps one of the CIFAR datasets under its root, and what it holds."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    torchvision_class: type
    env: str  # the environment variable its data config reads the root from


CIFAR10_FORMAT = CifarFormat("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                             "test_batch", "labels", 10, CIFAR10, "COMPRESS_DATA")
CIFAR100_FORMAT = CifarFormat("CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", 100, CIFAR100,
                              "COMPRESS_CIFAR100")


def default_root(dataset: str = "cifar10") -> Path:
    """Where a dataset is downloaded when no root is given: ``$XDG_CACHE_HOME/compress/<dataset>``
    (``~/.cache/compress/cifar10``), next to torch.hub's cache of the weights."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "compress" / dataset


def missing_file(root: Path, fmt: CifarFormat = CIFAR10_FORMAT) -> Path | None:
    """The first batch file of ``fmt`` (CIFAR-10 by default) that ``root`` (torchvision's layout) lacks, or None."""
    batches = root / fmt.folder
    return next((batches / n for n in (*fmt.train_files, fmt.test_file) if not (batches / n).is_file()), None)


def check_root(root: Path, fmt: CifarFormat = CIFAR10_FORMAT) -> None:
    """Raise ``FileNotFoundError`` unless ``root`` holds ``fmt``'s files in torchvision's layout."""
    missing = missing_file(root, fmt)
    if missing:
        raise FileNotFoundError(
            f"data.root={str(root)!r} does not hold {fmt.name} (missing {missing}): point data.root or {fmt.env} "
            f"at a torchvision {fmt.name.replace('-', '')} root ({fmt.folder}/ with "
            f"{', '.join((*fmt.train_files, fmt.test_file))}), or set data.download=true"
        )


def download(root: Path, fmt: CifarFormat = CIFAR10_FORMAT) -> None:
    """Fetch ``fmt`` into ``root`` with torchvision (md5-checked); ``ValueError`` in one line if it fails."""
    try:
        for train in (True, False):
            fmt.torchvision_class(str(root), train=train, download=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a failed md5 check
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"could not download {fmt.name} into {str(root)!r} ({reason}): offline, put the official "
            f"{fmt.folder} folder there, or set {fmt.env} (or data.root) to a {fmt.name} root"
        ) from None


def load_split(root: Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images as ``uint8 [N, 3, 32, 32]`` and labels as ``int64 [N]`` (torchvision, md5-checked)."""
    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision's MD5 check of the batch files failed
        raise ValueError(f"data.root={str(root)!r}: CIFAR-10 files are corrupt or incomplete ({e})") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def read_pickles(root: Path, fmt: CifarFormat, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``fmt``'s images (``uint8 [N, 3, 32, 32]``) and labels (``int64 [N]``) read straight from
    its pickle files under ``root`` (no md5 check)."""
    images, labels = [], []
    for name in fmt.train_files if train else (fmt.test_file,):
        path = root / fmt.folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[fmt.label_key])
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise ValueError(f"data.root={str(root)!r}: {path} is not a {fmt.name} batch "
                             f"(a pickle with 'data' and '{fmt.label_key}'): {type(e).__name__}: {e}") from None
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


# --- image folders ---------------------------------------------------------------------------


def _layout(root: Path) -> str:
    return f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> (torchvision ImageFolder layout)"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def find_classes(root: Path) -> list[str]:
    """The class names of an image folder: the sorted sub-folders of ``root/train``, each holding
    at least one image; ``FileNotFoundError``/``ValueError`` in one line otherwise."""
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} has no train/ folder: {_layout(root)}")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data.root={str(root)!r}: train/ holds no class folders: {_layout(root)}")
    empty = next((c for c in classes if not _images_in(train / c)), None)
    if empty is not None:
        raise ValueError(f"data.root={str(root)!r}: train/{empty}/ holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes


def folder_classes(root: str | None) -> int | None:
    """Resolver ``${folder_classes:${data.root}}`` (``data=imagefolder``'s ``num_classes``, so a
    model config can read ``${data.num_classes}``): how many class folders ``root/train`` holds;
    None where it cannot say (the datamodule then fails, naming the root and what it expects)."""
    try:
        return len(find_classes(Path(root).expanduser())) if root else None
    except (OSError, ValueError):
        return None


if not OmegaConf.has_resolver("folder_classes"):
    OmegaConf.register_new_resolver("folder_classes", folder_classes)


def decode(path: Path, size: int) -> np.ndarray:
    """One image file as ``uint8 [3, size, size]`` (RGB, bilinear resize to a square)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def read_folder(root: Path, split: str, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``root/<split>/<class>/`` (classes in ``classes`` order, files sorted) as
    ``uint8 [N, 3, size, size]`` and their class indices as ``int64 [N]``."""
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} has no {split}/ folder: {_layout(root)}")
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise ValueError(f"data.root={str(root)!r}: {split}/{unknown[0]}/ is not a class of train/ "
                         f"(its classes: {', '.join(classes)})")
    files = [(p, i) for i, c in enumerate(classes) if (folder / c).is_dir() for p in _images_in(folder / c)]
    if not files:
        raise ValueError(f"data.root={str(root)!r}: {split}/ holds no images: {_layout(root)}")
    images = np.stack([decode(p, size) for p, _ in files])
    return torch.from_numpy(images), torch.tensor([i for _, i in files], dtype=torch.int64)


# --- batching --------------------------------------------------------------------------------


def normalize(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """uint8 images to float, normalized with ``mean``/``std`` (0..1 scale; default: the
    checkpoint's), channels-last."""
    mean_ = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255)
    out = (images.float() - mean_) * inv_std
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

    Training batches are shuffled, cropped (``pad``) and flipped (seeded by :class:`EpochSeed`),
    and the last partial batch is dropped; evaluation batches keep order and every image.
    ``rank``/``world_size`` shard the data for DDP; ``mean``/``std`` normalize (0..1 scale).
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
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        pad: int = 4,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size = rank, world_size
        self.mean, self.std, self.pad = tuple(mean), tuple(std), pad
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
                x = augment(x, gen, self.pad)
            yield normalize(x, self.mean, self.std), self.labels[idx]


# --- any datamodule --------------------------------------------------------------------------


def batch_images(batch: Any) -> torch.Tensor:
    """The images of one batch of a loader: the batch itself if a tensor, else its first item
    (``(images, labels)`` as a DataLoader over a torchvision dataset yields)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a training batch of type {type(batch).__name__} is not allowed: "
                    "yield (images, labels) or an images tensor")


def leading_images(trainer: pl.Trainer, n: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The images of the trainer's datamodule's first (augmented) training batches, on
    ``device``, whole batches until at least ``n`` were yielded: what a calibration pass runs on.

    Works with any ``LightningDataModule`` whose training loader yields ``(images, labels)``
    (or images); outside ``fit`` it first calls the datamodule's ``setup("fit")``, since
    Lightning only set up the test data then (our datamodules set up once and return at once)."""
    datamodule = trainer.datamodule
    fitting = getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.FITTING
    if not fitting and callable(getattr(datamodule, "setup", None)):
        datamodule.setup("fit")
    seen = 0
    for batch in datamodule.train_dataloader():
        if seen >= n:
            return
        images = batch_images(batch)
        yield images.to(device)
        seen += len(images)


def describe(datamodule: Any) -> dict[str, Any]:
    """What a datamodule says about its data: ``num_classes``, ``mean``, ``std`` (lists of
    floats, 0..1 scale) and ``image_size``, each None where the datamodule does not say."""
    out: dict[str, Any] = {k: getattr(datamodule, k, None) for k in DESCRIBED}
    for k in ("mean", "std"):
        out[k] = [float(v) for v in out[k]] if out[k] is not None else None
    return out


def resolve_eval_batch(size: int | str, device: torch.device) -> int:
    """``eval_batch_size`` for data on ``device``: ``auto`` is 200 on a CPU (larger batches
    evaluate slower on 2 cores) and 2000 on a GPU (200 leaves it mostly idle)."""
    if size == "auto":
        return 200 if device.type == "cpu" else 2000
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    raise ValueError(f"data.eval_batch_size={size!r} is not allowed: use a positive integer or 'auto'")


# --- datamodules -----------------------------------------------------------------------------


class InMemoryData(pl.LightningDataModule):
    """A dataset held in memory, with a seeded validation split carved out of its training set.

    Subclasses say where the data is (:meth:`check`) and read it (:meth:`read`); this class
    splits, places and batches it (:class:`TensorBatches`).

    Args:
        root: where the data is (see the subclass).
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test, or ``auto`` (see :func:`resolve_eval_batch`).
        val_size: training images held out for validation: a count (0: none) or a fraction in [0, 1).
        seed: seeds the split and the shuffling.
        device: where the dataset lives and is augmented: ``auto`` (the attached trainer's
            device, so ``trainer=gpu`` keeps the data on the GPU), ``cpu`` or ``cuda``.
        train_subset: use only the first N training images (0: all); for smoke runs.
        test_split: which test images to test on: ``all``, or the ``search`` or ``report``
            half (see :func:`split_mask`), so a search selects on one half and reports on the other.
        num_classes, mean, std, image_size: what the data is (see the subclass).
    """

    def __init__(
        self,
        root: Path,
        batch_size: int,
        eval_batch_size: int | str,
        val_size: int | float,
        seed: int,
        device: str,
        train_subset: int,
        test_split: str,
        num_classes: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        image_size: int,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.seed, self.device, self.train_subset = val_size, seed, device, train_subset
        self.test_split = check_test_split(test_split)
        self.num_classes = check_positive("data.num_classes", num_classes)
        default_mean, default_std = self.default_stats()
        self.mean, self.std = check_stats("data.mean", mean, default_mean), check_stats("data.std", std, default_std)
        self.image_size = check_positive("data.image_size", image_size)
        self.pad = max(1, round(self.image_size / 8))  # 4 pixels at 32x32
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def default_stats(cls) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalization ``(mean, std)`` where the config gives none: the checkpoint's."""
        return MEAN, STD

    def check(self) -> None:
        """Fail early (naming the root) if the data is not there."""

    def read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The training or test images (``uint8 [N, 3, S, S]``, file order) and labels (``int64 [N]``)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Lightning's hook for fetching data: :meth:`check` (nothing once the splits are in memory)."""
        if not self.splits:
            self.check()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.check()
        images, labels = self.read(train=True)
        val_size = resolve_val_size(self.val_size, len(labels))
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:val_size], order[val_size:]
        if self.train_subset:
            train_idx = train_idx[: self.train_subset]
        test_images, test_labels = self.read(train=False)
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
        return TensorBatches(images, labels, bs, train, self.seed, rank, world, self.mean, self.std, self.pad)

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> TensorBatches | list:
        return self._batches("val", train=False) if self.val_size and len(self.splits["val"][1]) else []

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", train=False)


class CifarData(InMemoryData):
    """A CIFAR dataset (:attr:`FORMAT`) in torchvision's layout under ``root``.

    Args:
        root: torchvision root (holding ``FORMAT.folder``); None: :func:`default_root`.
        download: fetch the dataset (with torchvision's md5 checks) if it is missing: ``True``,
            ``False``, or ``auto`` (only into the default root, when no root is given).
        num_classes, image_size: must be the dataset's (checked); mean, std: its normalization.
        The rest: see :class:`InMemoryData`.
    """

    FORMAT: CifarFormat = CIFAR10_FORMAT
    DEFAULT_ROOT = "cifar10"

    def __init__(
        self,
        root: str | None = None,
        download: bool | str = "auto",
        batch_size: int = 128,
        eval_batch_size: int | str = "auto",
        val_size: int | float = 5000,
        seed: int = 0,
        device: str = "auto",
        train_subset: int = 0,
        test_split: str = "all",
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int = 32,
    ) -> None:
        fmt = self.FORMAT
        if download not in DOWNLOADS:
            raise ValueError(f"data.download={download!r} is not allowed: use auto, true or false")
        if num_classes not in (None, fmt.num_classes):
            raise ValueError(f"data.num_classes={num_classes!r} is not allowed for {fmt.name}: "
                             f"it has {fmt.num_classes} classes")
        if image_size != 32:
            raise ValueError(f"data.image_size={image_size!r} is not allowed for {fmt.name}: its images are 32x32")
        self.download = download is True or (download == "auto" and root is None)
        super().__init__(
            Path(root).expanduser() if root is not None else default_root(self.DEFAULT_ROOT), batch_size,
            eval_batch_size, val_size, seed, device, train_subset, test_split, fmt.num_classes, mean, std, image_size)

    def check(self) -> None:
        """Download the data if it is missing and allowed, else fail early naming the root."""
        if self.download and missing_file(self.root, self.FORMAT):
            download(self.root, self.FORMAT)
        check_root(self.root, self.FORMAT)

    def read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return read_pickles(self.root, self.FORMAT, train)


class CIFAR10Data(CifarData):
    """CIFAR-10 (``data=cifar10``; ``root`` defaults to ``$COMPRESS_DATA``), read with
    torchvision's md5 checks; normalized by default with the published checkpoint's statistics."""

    FORMAT = CIFAR10_FORMAT
    DEFAULT_ROOT = "cifar10"

    def read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return load_split(self.root, train=train)


class CIFAR100Data(CifarData):
    """CIFAR-100 (``data=cifar100``; ``root`` defaults to ``$COMPRESS_CIFAR100``): 100 classes
    (``fine_labels``), normalized by default with its training-set statistics."""

    FORMAT = CIFAR100_FORMAT
    DEFAULT_ROOT = "cifar100"

    @classmethod
    def default_stats(cls) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return CIFAR100_MEAN, CIFAR100_STD


class ImageFolderData(InMemoryData):
    """Images in class folders (``data=imagefolder``), decoded once, resized to ``image_size``.

    ``root`` holds ``train/<class>/<image>`` and ``test/<class>/<image>`` (torchvision's
    ImageFolder layout; .png, .jpg, .jpeg, .bmp, .ppm, .pgm, .tif, .tiff, .webp): the classes are
    the sorted folder names of ``train/`` (``test/`` may lack some, not add any). Every image
    is converted to RGB and resized (bilinear) to ``image_size`` x ``image_size``, aspect
    ratio not kept. The validation split is carved out of ``train/`` as for CIFAR.

    Args:
        root: the folder (the config defaults it to ``$COMPRESS_IMAGEFOLDER``); required.
        num_classes: None: the number of class folders; a number: checked against them.
        mean, std: normalization (0..1 scale); None: ImageNet's (the CIFAR-10 defaults).
        The rest: see :class:`InMemoryData`.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | str = "auto",
        val_size: int | float = 0.1,
        seed: int = 0,
        device: str = "auto",
        train_subset: int = 0,
        test_split: str = "all",
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        image_size: int = 32,
    ) -> None:
        if root is None:
            raise ValueError("data.root is not set: point data.root (or COMPRESS_IMAGEFOLDER) at a folder with "
                             "train/<class>/<image> and test/<class>/<image>")
        path = Path(root).expanduser()
        self.classes = find_classes(path)
        if num_classes is not None and num_classes != len(self.classes):
            raise ValueError(f"data.num_classes={num_classes!r} disagrees with data.root={str(path)!r}: train/ has "
                             f"{len(self.classes)} class folders ({', '.join(self.classes[:5])}"
                             f"{', ...' if len(self.classes) > 5 else ''})")
        super().__init__(path, batch_size, eval_batch_size, val_size, seed, device, train_subset, test_split,
                         len(self.classes), mean, std, image_size)

    def check(self) -> None:
        find_classes(self.root)

    def read(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return read_folder(self.root, "train" if train else "test", self.classes, self.image_size)


def concat_batches(batches: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(images, labels)`` batches of a loader, concatenated on the CPU (contiguous NCHW)."""
    xs, ys = [], []
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(f"a test batch of type {type(batch).__name__} is not allowed: yield (images, labels)")
        xs.append(batch[0].cpu())
        ys.append(torch.as_tensor(batch[1]).cpu())
    if not xs:
        raise ValueError("the test loader yields no batch")
    return torch.cat(xs).contiguous(), torch.cat(ys)
