"""Shared fixtures: real data/weights (skipped when not configured), a small random ResNet-20,
and a helper running the Hydra app in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from compress.models import resnet20

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

RunApp = Callable[..., subprocess.CompletedProcess]


def _env_path(var: str, what: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is not set: {what} not available")
    path = Path(value).expanduser()
    if not path.exists():
        pytest.skip(f"{var}={value!r} does not exist")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The CIFAR-10 root from ``$COMPRESS_DATA``; skips the test when it is unset."""
    return _env_path("COMPRESS_DATA", "real CIFAR-10 data")


@pytest.fixture(scope="session")
def pretrained() -> Path:
    """The published ResNet-20 checkpoint from ``$COMPRESS_PRETRAINED``; skips when unset."""
    return _env_path("COMPRESS_PRETRAINED", "pretrained weights")


@pytest.fixture
def resnet() -> torch.nn.Module:
    """A randomly initialized ResNet-20 (seeded)."""
    torch.manual_seed(0)
    return resnet20()


@pytest.fixture(scope="session")
def block_names() -> set[str]:
    """Names of the 18 residual-block convolutions of ResNet-20."""
    return {f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)}


@pytest.fixture
def run_app(tmp_path_factory: pytest.TempPathFactory) -> RunApp:
    """``run_app(*overrides, run_dir=None, env=None, timeout=600)`` runs
    ``python -m compress.train`` from the repository root with its own run dir and stage cache
    and returns the ``CompletedProcess`` (text output captured). The run dir used is attached
    as ``proc.run_dir``."""

    def run(*overrides: str, run_dir: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        # mktemp gives names without the brackets of parametrized test ids, which Hydra's
        # override grammar would read as a list.
        base = tmp_path_factory.mktemp("app")
        run_dir = run_dir or base / "run"
        full_env = {**os.environ, **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        cmd = [sys.executable, "-m", "compress.train", *overrides, f"hydra.run.dir={run_dir}",
               f"stage_cache={base / 'cache'}"]
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        proc.run_dir = run_dir  # type: ignore[attr-defined]
        return proc

    return run
