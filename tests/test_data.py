"""The in-memory CIFAR-10 pipeline: batched augmentation, batching, sharding, checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hydra.utils import instantiate

from compress.data import (MEAN, STD, CIFAR10Data, EpochSeed, TensorBatches, augment, check_root, check_test_split,
                           describe, normalize, resolve_eval_batch, split_mask)
from conftest import Compose


def images(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_augment_is_a_padded_crop_and_flip_of_each_image() -> None:
    """Per image, the batched result equals some 32x32 window of the zero-padded image, flipped
    or not; over a batch both flips and several offsets occur."""
    x = images(64)
    out = augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert matches, f"image {i} is not a crop of its padded original"
        seen.add(matches[0])
    assert {flip for *_, flip in seen} == {False, True} and len({(dy, dx) for dy, dx, _ in seen}) > 10


def test_augment_is_seeded() -> None:
    x = images()
    a, b = (augment(x, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))


def test_normalize_uses_the_checkpoints_statistics() -> None:
    x = images(4)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = normalize(x)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_eval_batches_keep_order_and_every_image() -> None:
    x, y = images(10), torch.arange(10)
    batches = list(TensorBatches(x, y, 4, train=False))
    assert [len(b[1]) for b in batches] == [4, 4, 2] and len(TensorBatches(x, y, 4, train=False)) == 3
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), normalize(x))


def test_train_batches_shuffle_per_epoch_and_drop_the_last_partial() -> None:
    x, y = images(10), torch.arange(10)
    loader = TensorBatches(x, y, 4, train=True, seed=0)
    epoch0 = [b[1] for b in loader]
    assert len(loader) == 2 and [len(b) for b in epoch0] == [4, 4]
    assert all(torch.equal(a, b[1]) for a, b in zip(epoch0, loader)), "the same epoch repeats its order"
    assert len(set(torch.cat(epoch0).tolist())) == 8, "no image twice in an epoch"
    loader.sampler.set_epoch(1)
    epoch1 = torch.cat([b[1] for b in loader])
    assert not torch.equal(epoch1, torch.cat(epoch0)), "epoch 1 reshuffles"
    assert isinstance(loader.sampler, EpochSeed)


def test_ddp_shards_are_disjoint_and_cover_the_test_set() -> None:
    x, y = images(10), torch.arange(10)
    shards = [torch.cat([b[1] for b in TensorBatches(x, y, 3, train=False, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_eval_batch_size_auto_and_bad_values() -> None:
    assert resolve_eval_batch("auto", torch.device("cpu")) == 200
    assert resolve_eval_batch("auto", torch.device("cuda")) == 2000
    assert resolve_eval_batch(512, torch.device("cuda")) == 512
    for bad in (0, -1, "big", True):
        with pytest.raises(ValueError, match=f"data.eval_batch_size={bad!r} is not allowed"):
            resolve_eval_batch(bad, torch.device("cpu"))


def test_check_root_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1") as err:
        check_root(tmp_path)
    assert f"data.root={str(tmp_path)!r}" in str(err.value)


def test_test_split_halves_are_seeded_disjoint_and_cover_the_test_set() -> None:
    everything = split_mask(10_000, "all")
    search, report = split_mask(10_000, "search"), split_mask(10_000, "report")
    assert everything.all() and int(search.sum()) == int(report.sum()) == 5_000
    assert not (search & report).any() and (search | report).all()
    assert torch.equal(search, split_mask(10_000, "search"))  # a fixed seed: the same halves every time
    assert 0.4 < search[:5_000].float().mean() < 0.6  # mixed through the file, not its first half
    for bad in ("train", "", None):
        with pytest.raises(ValueError, match=f"data.test_split={bad!r} is not allowed: use one of all, search, report"):
            check_test_split(bad)


def test_cifar10_config_describes_its_data_and_normalizes_as_before(hydra_compose: Compose, tmp_path: Path) -> None:
    """``data=cifar10`` says 10 classes, 32x32, the checkpoint's mean/std; normalizing with the
    config's lists is bit for bit what the constants give."""
    cfg = hydra_compose([f"data.root={tmp_path}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, CIFAR10Data) and (dm.num_classes, dm.mean, dm.std, dm.image_size) == (10, MEAN, STD, 32)
    assert describe(dm) == {"num_classes": 10, "mean": list(MEAN), "std": list(STD), "image_size": 32}
    assert dm.pad == 4 and not dm.download
    x = images(8)
    assert torch.equal(normalize(x, list(cfg.data.mean), list(cfg.data.std)), normalize(x))
    batches = TensorBatches(x, torch.arange(8), 4, train=True, mean=cfg.data.mean, std=cfg.data.std)
    plain = TensorBatches(x, torch.arange(8), 4, train=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, plain))


def test_cifar10_rejects_another_class_count_or_size(tmp_path: Path) -> None:
    for kw, match in (({"num_classes": 100}, "data.num_classes=100 is not allowed for CIFAR-10: it has 10 classes"),
                      ({"image_size": 64}, "data.image_size=64 is not allowed for CIFAR-10: its images are 32x32"),
                      ({"mean": [0.5, 0.5]}, r"data.mean=\[0.5, 0.5\] is not allowed: use 3 numbers"),
                      ({"val_size": 1.5}, r"data.val_size=1.5 is not allowed")):
        with pytest.raises(ValueError, match=match):
            dm = CIFAR10Data(root=str(tmp_path), **kw)
            dm.read = lambda train: (images(4), torch.arange(4))  # type: ignore[method-assign]
            dm.check = lambda: None  # type: ignore[method-assign]
            dm.setup()
