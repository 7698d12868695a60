"""Installing like any package: the wheel carries the configs and runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject() -> None:
    """pyproject lists packages by hand (conf/ is mapped to compress.conf): a new subpackage
    missing from the list would be left out of wheels while editable installs still work."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "compress").rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"compress.conf"}
    assert tool["package-dir"] == {"compress.conf": "conf"}


@pytest.mark.slow
def test_wheel_runs_from_another_directory(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    """Build the wheel, install it (without dependencies, which this environment has) into a
    target dir, and evaluate the pretrained model from a directory outside the checkout."""
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("compress-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "COMPRESS_DATA": str(data_root), "COMPRESS_PRETRAINED": str(pretrained)}
    where = subprocess.run([sys.executable, "-c", "import compress.conf as c; print(c.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))  # the installed copy, not the checkout
    proc = subprocess.run([sys.executable, "-m", "compress.train", "quant=none", "trainer.max_epochs=0", "budget=debug",
                           "logger=none"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert list((work / "outputs").rglob("metrics.json"))
    help_text = subprocess.run([sys.executable, "-m", "compress.train", "--help"], cwd=work, env=env, capture_output=True,
                               text=True, timeout=120).stdout
    assert "budget: debug, full, smoke" in help_text and "Examples:" in help_text
