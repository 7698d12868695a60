"""Networks and data nobody here wrote: torchvision's MobileNetV2, a model class and a
LightningDataModule from a user's own file, an image folder; each run ends with a model.cpk that
verify and the ONNX export accept. Bad input: one ``error:`` line, exit 2, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

USER_FILE = '''
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SmallCNN(nn.Module):
    """conv-bn-relu x2, pooled, a linear head: the user's own network."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class RandomData(pl.LightningDataModule):
    """Seeded random 3x16x16 images, labels from the mean colour: ordinary DataLoaders, no test
    split unless asked."""

    def __init__(self, n: int = 96, num_classes: int = 4, with_test: bool = True) -> None:
        super().__init__()
        self.n, self.num_classes, self.image_size, self.with_test = n, num_classes, 16, with_test
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, 16, 16, generator=gen)
        y = (x.mean((1, 2, 3)) * 40).long().clamp(-2, 1) + 2
        self.data = TensorDataset(x, y % num_classes)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=32)


class RandomDataWithTest(RandomData):
    def test_dataloader(self):
        return DataLoader(self.data, batch_size=32)
'''


def app(args: list[str], tmp: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m compress.train *args`` with its run dir and stage cache under ``tmp``, the
    user's file on PYTHONPATH, one thread."""
    full = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
            **(env or {})}
    full.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "compress.train", *args, f"hydra.run.dir={tmp / 'run'}", f"stage_cache={tmp / 'cache'}",
           "progress=none"]
    return subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=600)


def tool(module: str, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "mine.py").write_text(USER_FILE)
    return tmp_path


def finished(proc: subprocess.CompletedProcess, tmp: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "run"
    assert (run / "model.cpk").is_file() and (run / "model.pt").is_file()
    return json.loads((run / "metrics.json").read_text())


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow  # an end-to-end run of half a minute or more: .ci/run runs it with -m slow
def test_torchvision_mobilenet_v2_compresses_verifies_and_exports(data_root: Path, tmp_path: Path) -> None:
    proc = app(["model.net._target_=torchvision.models.mobilenet_v2", "model.net.num_classes=10", "model.name=mnv2",
                "model.pretrained=null", "prune=global", "quant=asym", "nbits=4", "budget=debug"], tmp_path)
    m = finished(proc, tmp_path)
    assert m["choices"]["model"] == "mnv2" and m["max_distinct_values"] <= 16 and m["sparsity"]["overall"] >= 0.8
    quantized = set(m["distinct_values"])
    assert "features.0.0" not in quantized and "classifier.1" not in quantized  # first conv, classifier FP
    assert len(quantized) == 51
    assert all(v is None for v in m["layer_sparsity"].values())  # global: one threshold, no layer emptied
    assert min(1 - s for s in m["sparsity"]["layers"].values()) >= 0.001
    verified = tool("compress.verify", [str(tmp_path / "run")], tmp_path)
    assert verified.returncode == 0 and "1 of 1 runs verified" in verified.stdout, verified.stdout + verified.stderr
    exported = tool("compress.export", [str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx"), "--check-images", "100"],
                    tmp_path)
    assert exported.returncode == 0 and "UINT4 codes" in exported.stdout and ": ok" in exported.stdout, exported.stdout


def test_a_users_model_and_datamodule_from_their_own_file(user_dir: Path) -> None:
    proc = app(["model.net._target_=mine.SmallCNN", "model.name=small", "model.pretrained=null", "data=custom",
                "data._target_=mine.RandomDataWithTest", "data.num_classes=4", "model.net.num_classes=4",
                "prune=global", "quant=sym", "nbits=3", "quant.layers.keep_first=false", "budget=debug"], user_dir)
    m = finished(proc, user_dir)
    assert m["test_images"] == 64 and m["data"]["num_classes"] == 4 and m["data"]["image_size"] == 16
    assert set(m["distinct_values"]) == {"body.0", "body.3", "body.6"}  # every conv; the head (last) kept FP
    assert m["max_distinct_values"] <= 7
    from compress import load

    sys.path.insert(0, str(user_dir))
    try:
        model = load(user_dir / "run" / "model.cpk")
        assert type(model).__name__ == "SmallCNN" and model.head.out_features == 4
    finally:
        sys.path.remove(str(user_dir))
    verified = tool("compress.verify", [str(user_dir / "run")], user_dir)
    assert verified.returncode == 0 and "1 of 1 runs verified" in verified.stdout, verified.stdout + verified.stderr
    exported = tool("compress.export", [str(user_dir / "run"), "--onnx", str(user_dir / "m.onnx"), "--check-images", "32"],
                    user_dir)
    assert exported.returncode == 0 and ": ok" in exported.stdout, exported.stdout + exported.stderr


def test_an_image_folder(user_dir: Path) -> None:
    for split, count in (("train", 24), ("test", 6)):
        for c, colour in enumerate(("red", "green", "blue")):
            folder = user_dir / "images" / split / colour
            folder.mkdir(parents=True)
            for i in range(count // 3):
                Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
    proc = app(["model.net._target_=mine.SmallCNN", "model.name=small", "model.pretrained=null", "data=imagefolder",
                f"data.root={user_dir / 'images'}", "data.image_size=16", "prune=oneshot", "quant=none", "budget=debug"],
               user_dir)
    m = finished(proc, user_dir)
    assert m["data"]["num_classes"] == 3 and m["test_images"] == 6 and m["choices"]["prune"] == "oneshot"
    verified = tool("compress.verify", [str(user_dir / "run")], user_dir)
    assert verified.returncode == 0 and "1 of 1 runs verified" in verified.stdout, verified.stdout + verified.stderr


@pytest.mark.parametrize(("overrides", "needles"), [
    (["prune=global", "prune.layers.include=[nope]"], ["prune.layers.include: 'nope' matches no Conv2d/Linear layer",
                                                      "use one of body.0, body.3, body.6, head"]),
    (["quant=asym", "quant.layers.types=[ConvTranspose2d]"], ["quant=asym found nothing to quantize in SmallCNN"]),
    (["quant=asym", "quant.layers.types=[Conv3x3]"], ["quant.layers.types='Conv3x3' is not a module type"]),
    (["data._target_=mine.RandomData"], ["has no test data: give it a test_dataloader()"]),
    (["model.net.num_classes=5"], ["model.net predicts 5 classes, the data has 4: set model.net.num_classes=4"]),
    (["prune=global", "+prune.sparsty=0.5"], ["prune.sparsty is not an option of prune (PruningCallback): use one of"]),
    (["data.num_classes=4", "+data.colour=red"], ["data.colour is not an argument of mine.RandomDataWithTest"]),
    (["model.net._target_=mine.Nope"], ["model.net._target_='mine.Nope' could not be built"]),
])
def test_bad_input_is_one_line_and_leaves_nothing(user_dir: Path, overrides: list[str], needles: list[str]) -> None:
    base = ["model.net._target_=mine.SmallCNN", "model.name=small", "model.pretrained=null", "data=custom",
            "data._target_=mine.RandomDataWithTest", "data.num_classes=4", "model.net.num_classes=4", "budget=debug"]
    proc = app([*base, *overrides], user_dir)
    one_line_error(proc, *needles)
    assert not (user_dir / "run").exists()


def test_a_failure_after_training_keeps_the_trained_model(tmp_path: Path) -> None:
    """The run dir of a failed single run is removed only when it holds nothing to keep."""
    from compress.train import discard_failed

    (tmp_path / "a").mkdir()
    torch.save({}, tmp_path / "a" / "model.pt")
    discard_failed(tmp_path / "a")
    assert (tmp_path / "a" / "model.pt").is_file()
    (tmp_path / "b").mkdir()
    discard_failed(tmp_path / "b")
    assert not (tmp_path / "b").exists()
