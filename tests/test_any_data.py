"""Data other than CIFAR-10: CIFAR-100 (fake pickles), image folders (tiny PNGs), a user's
datamodule with ordinary DataLoaders, and verify's test set of a non-CIFAR-10 run."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from compress.module import Classifier
from compress import stages
from compress.data import (CIFAR100_MEAN, CIFAR100_STD, MEAN, STD, CIFAR100Data, ImageFolderData, TensorBatches,
                           describe, leading_images, normalize)
from compress.verify import test_tensors as verify_test_tensors
from conftest import Compose

GEN = torch.Generator().manual_seed(0)


def fake_cifar100(root: Path, train: int = 30, test: int = 10) -> dict[str, np.ndarray]:
    """torchvision's CIFAR-100 files under ``root`` with random images; fine labels 50..99
    (coarse ones 0..19, so reading the wrong key shows)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", train), ("test", test)):
        data = torch.randint(0, 256, (n, 3 * 32 * 32), dtype=torch.uint8, generator=GEN).numpy()
        fine = [50 + i % 50 for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [i % 20 for i in range(n)]}, f)
        out[name] = data
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return out


def test_cifar100_reads_fine_labels_and_normalizes_with_its_statistics(tmp_path: Path) -> None:
    files = fake_cifar100(tmp_path)
    dm = CIFAR100Data(root=str(tmp_path), val_size=6, batch_size=8, eval_batch_size=4, device="cpu")
    assert describe(dm) == {"num_classes": 100, "mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD),
                            "image_size": 32}
    assert not dm.download  # a given root is never downloaded into (download=auto)
    dm.setup("fit")
    assert [len(dm.splits[k][1]) for k in ("train", "val", "test")] == [24, 6, 10]
    assert dm.splits["train"][0].shape == (24, 3, 32, 32) and dm.splits["train"][0].dtype == torch.uint8
    labels = torch.cat([dm.splits["train"][1], dm.splits["val"][1]])
    assert sorted(labels.tolist()) == sorted(50 + i % 50 for i in range(30))
    x, y = (torch.cat(t) for t in zip(*dm.test_dataloader()))
    expected = torch.from_numpy(files["test"]).view(-1, 3, 32, 32)
    assert torch.equal(y, torch.tensor([50 + i for i in range(10)]))
    torch.testing.assert_close(x, normalize(expected, CIFAR100_MEAN, CIFAR100_STD))
    assert not torch.allclose(x, normalize(expected))  # not CIFAR-10's statistics
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32)


def test_cifar100_config(hydra_compose: Compose, tmp_path: Path) -> None:
    fake_cifar100(tmp_path)
    cfg = hydra_compose(["data=cifar100", f"data.root={tmp_path}"])
    assert (cfg.data.num_classes, list(cfg.data.mean), list(cfg.data.std), cfg.data.image_size) == (
        100, list(CIFAR100_MEAN), list(CIFAR100_STD), 32)
    dm = instantiate(cfg.data)
    assert isinstance(dm, CIFAR100Data) and dm.mean == CIFAR100_MEAN and dm.num_classes == 100


def test_cifar100_missing_or_mismatched_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not hold CIFAR-100 \(missing .*cifar-100-python/train\)") as err:
        CIFAR100Data(root=str(tmp_path)).setup()
    assert f"data.root={str(tmp_path)!r}" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data.num_classes=10 is not allowed for CIFAR-100: it has 100 classes"):
        CIFAR100Data(root=str(tmp_path), num_classes=10)
    with pytest.raises(ValueError, match="data.image_size=64 is not allowed for CIFAR-100: its images are 32x32"):
        CIFAR100Data(root=str(tmp_path), image_size=64)
    with pytest.raises(ValueError, match=r"data.std=\[0.2, 0.0, 0.2\] is not allowed: use 3 numbers"):
        CIFAR100Data(root=str(tmp_path), std=[0.2, 0.0, 0.2])
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test"):
        (tmp_path / "cifar-100-python" / name).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="is not a CIFAR-100 batch"):
        CIFAR100Data(root=str(tmp_path)).setup()


COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def image_folder(root: Path, per_class: int = 4) -> Path:
    """``root/train/{ant,bee,cat}/`` with ``per_class`` one-colour PNGs/JPGs of various sizes,
    ``root/test/{ant,cat}/`` with one each, and a stray non-image file."""
    for split, classes, n in (("train", COLORS, per_class), ("test", ("ant", "cat"), 1)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10 + i, 7 + 2 * i), COLORS[c]).save(root / split / c / f"{i}.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    Image.new("L", (5, 5), 0).save(root / "train" / "bee" / "gray.jpg")  # grayscale: converted to RGB
    return root


def test_image_folder_decodes_resizes_and_splits(tmp_path: Path) -> None:
    root = image_folder(tmp_path)
    dm = ImageFolderData(root=str(root), image_size=8, val_size=0.25, batch_size=3, eval_batch_size=2, device="cpu")
    assert dm.classes == ["ant", "bee", "cat"] and dm.num_classes == 3 and dm.pad == 1
    assert describe(dm) == {"num_classes": 3, "mean": list(MEAN), "std": list(STD), "image_size": 8}
    dm.setup("fit")
    (tx, ty), (vx, vy), (sx, sy) = (dm.splits[k] for k in ("train", "val", "test"))
    assert (len(ty), len(vy), len(sy)) == (10, 3, 2)  # 13 training images, a quarter held out
    assert tx.shape == (10, 3, 8, 8) and tx.dtype == torch.uint8 and sx.shape == (2, 3, 8, 8)
    assert sorted(torch.cat([ty, vy]).tolist()) == [0] * 4 + [1] * 5 + [2] * 4
    assert torch.equal(sy, torch.tensor([0, 2]))
    for img, label in zip(torch.cat([tx, vx, sx]), torch.cat([ty, vy, sy])):
        colour = (0, 0, 0) if img.sum() == 0 else COLORS[["ant", "bee", "cat"][label]]
        assert torch.equal(img, torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    x, y = (torch.cat(t) for t in zip(*dm.test_dataloader()))
    torch.testing.assert_close(x, normalize(sx))
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [3, 3, 3] and batches[0][0].shape == (3, 3, 8, 8)
    again = ImageFolderData(root=str(root), image_size=8, val_size=0.25, device="cpu")
    again.setup()
    assert torch.equal(again.splits["val"][1], vy), "the validation split is seeded"


def test_image_folder_config(hydra_compose: Compose, tmp_path: Path) -> None:
    root = image_folder(tmp_path)
    cfg = hydra_compose(["data=imagefolder", f"data.root={root}", "data.image_size=16"])
    assert cfg.data.num_classes == 3  # counted from the folders when the config is resolved
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageFolderData) and (dm.num_classes, dm.image_size, dm.mean) == (3, 16, MEAN)
    assert hydra_compose(["data=imagefolder", f"data.root={tmp_path / 'nope'}"]).data.num_classes is None
    with pytest.raises(InstantiationException, match="data.num_classes=4 disagrees"):  # Hydra wraps the ValueError
        instantiate(hydra_compose(["data=imagefolder", f"data.root={root}", "data.num_classes=4"]).data)


def test_image_folder_errors_are_one_line(tmp_path: Path) -> None:
    def fails(error: type[Exception], match: str, root: Path | None, **kw: object) -> None:
        with pytest.raises(error, match=match) as err:
            ImageFolderData(root=None if root is None else str(root), **kw).setup()
        assert "\n" not in str(err.value)

    fails(ValueError, r"data.root is not set: .*train/<class>/<image>", None)
    fails(FileNotFoundError, rf"data.root='{tmp_path / 'nope'}' has no train/ folder: expected", tmp_path / "nope")
    (tmp_path / "train").mkdir()
    fails(ValueError, "train/ holds no class folders", tmp_path)
    (tmp_path / "train" / "ant").mkdir()
    fails(ValueError, r"train/ant/ holds no images \(.png", tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "ant" / "0.png")
    fails(ValueError, r"data.num_classes=2 disagrees with data.root=.*: train/ has 1 class folders \(ant\)", tmp_path,
          num_classes=2)
    fails(FileNotFoundError, "has no test/ folder", tmp_path, val_size=0)
    (tmp_path / "test" / "bee").mkdir(parents=True)
    fails(ValueError, r"test/bee/ is not a class of train/ \(its classes: ant\)", tmp_path, val_size=0)
    (tmp_path / "test" / "bee").rmdir()
    (tmp_path / "test" / "ant").mkdir()
    fails(ValueError, "test/ holds no images", tmp_path, val_size=0)
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "ant" / "0.png")
    fails(ValueError, "data.val_size=1 leaves none of the 1 training images to train on", tmp_path, val_size=1)
    (tmp_path / "test" / "ant" / "1.png").write_bytes(b"broken")
    fails(ValueError, r"1.png is not a readable image", tmp_path, val_size=0)


class PlainData(pl.LightningDataModule):
    """A user's datamodule: ordinary DataLoaders, no ``labels``, no ``check()``; it builds its
    training data only in ``setup("fit")`` and its test data only in ``setup("test")``."""

    def __init__(self, n: int = 20, root: str | None = None) -> None:
        super().__init__()
        self.n, self.root, self.stages = n, root, []

    def setup(self, stage: str | None = None) -> None:
        self.stages.append(stage)
        x = torch.arange(self.n * 12, dtype=torch.float32).view(self.n, 3, 2, 2)
        setattr(self, "train" if stage == "fit" else "test", TensorDataset(x, torch.arange(self.n) % 4))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=6, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=6)


def test_test_pass_counts_the_images_of_an_ordinary_loader() -> None:
    """The pipeline's test pass counts the images it tested from the batches, whatever the loader."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert stages.test(trainer, Classifier(net), PlainData(n=25))["images"] == 25
    limited = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_test_batches=2)
    assert stages.test(limited, Classifier(net), PlainData(n=25))["images"] == 12  # two batches of 6


def test_leading_images_of_an_ordinary_loader_sets_up_the_training_data() -> None:
    dm = PlainData()
    trainer = SimpleNamespace(datamodule=dm, state=SimpleNamespace(fn=TrainerFn.TESTING), training=False)
    batches = list(leading_images(trainer, 7, torch.device("cpu")))  # type: ignore[arg-type]
    assert dm.stages == ["fit"] and [len(b) for b in batches] == [6, 6]
    assert describe(dm) == dict.fromkeys(("num_classes", "mean", "std", "image_size"))
    fitting = SimpleNamespace(datamodule=dm, state=SimpleNamespace(fn=TrainerFn.FITTING), training=True)
    assert [len(b) for b in leading_images(fitting, 20, torch.device("cpu"))] == [6, 6, 6, 2]  # type: ignore[arg-type]
    assert dm.stages == ["fit"], "Lightning set up the training data itself while fitting"


def test_verify_rebuilds_an_image_folder_runs_test_set(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data")
    cfg = {"_target_": "compress.data.ImageFolderData", "root": str(tmp_path / "elsewhere"), "batch_size": 128,
           "eval_batch_size": "auto", "val_size": 0.1, "seed": 3, "device": "auto", "train_subset": 0,
           "test_split": "search", "num_classes": None, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
           "image_size": 8}
    x, y = verify_test_tensors(cfg, str(root))  # --data in place of the run's root
    dm = ImageFolderData(root=str(root), image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu")
    dm.setup("test")  # test_split=all: every test image, in file order
    ex, ey = (torch.cat(t) for t in zip(*dm.test_dataloader()))
    assert torch.equal(y, ey) and torch.equal(x, ex) and x.is_contiguous() and x.shape == (2, 3, 8, 8)
    assert torch.equal(verify_test_tensors(cfg | {"root": str(root)}, None)[1], y)  # the run's own root
    with pytest.raises(FileNotFoundError, match="elsewhere' has no train/ folder"):
        verify_test_tensors(cfg, None)


def test_verify_builds_a_users_datamodule_or_says_it_cannot_import_it() -> None:
    x, y = verify_test_tensors({"_target_": "test_any_data.PlainData", "n": 8}, None)
    assert x.shape == (8, 3, 2, 2) and torch.equal(y, torch.arange(8) % 4)
    for target, why in (("no_such_package.Data", "ModuleNotFoundError"), ("test_any_data.Nope", "no 'Nope' in module")):
        message = rf"data._target_='{target}' cannot be imported \({why}.*PYTHONPATH"
        with pytest.raises(ValueError, match=message) as err:
            verify_test_tensors({"_target_": target}, None)
        assert "\n" not in str(err.value)
