"""Shared fixtures: real data/weights (skipped when not configured), a small random ResNet-20,
and a helper running the Hydra app in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from compress.models import resnet20

REPO = Path(__file__).resolve().parents[1]

RunApp = Callable[..., subprocess.CompletedProcess]
Compose = Callable[..., DictConfig]


@pytest.fixture
def hydra_compose(monkeypatch: pytest.MonkeyPatch) -> Iterator[Compose]:
    """``hydra_compose(overrides=(), **kw)``: the app's config composed from ``conf/`` (as
    ``hydra.compose``), with ``$COMPRESS_RUNS`` unset so sweep dirs take their default."""
    monkeypatch.delenv("COMPRESS_RUNS", raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda overrides=(), **kw: compose("config", overrides=list(overrides), **kw)


@pytest.fixture
def prepared() -> Callable[[DictConfig], None]:
    """``prepared(cfg)``: validate ``cfg``, build its methods and network, and let each method
    check the network (as ``compress.train`` does before any data or training)."""
    from compress.config import validate
    from compress.models.net import build_net
    from compress.train import build_methods

    def prepare(cfg: DictConfig) -> None:
        validate(cfg)
        methods, _ = build_methods(cfg)
        model = build_net(cfg.model.net)
        for method in methods:
            method.prepare(model)
    return prepare


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    """Run in-process torch on one thread. The tests use small tensors, and on a small shared
    CPU OpenMP's spinning barriers make two threads up to 100x slower than one whenever
    another process is busy. Subprocesses (the app) keep their own default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def app_command(overrides: Sequence[str], base: Path, run_dir: Path | None = None,
                env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str], Path]:
    """Command line, environment and run dir of ``python -m compress.train *overrides`` with
    its run dir and stage cache under ``base`` (a path without brackets or ``=``, which Hydra's
    override grammar would misread)."""
    run_dir = run_dir or base / "run"
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "compress.train", *overrides, f"hydra.run.dir={run_dir}",
           f"stage_cache={base / 'cache'}"]
    return cmd, full_env, run_dir


@pytest.fixture
def run_app(tmp_path_factory: pytest.TempPathFactory) -> RunApp:
    """``run_app(*overrides, run_dir=None, env=None, timeout=600)`` runs
    ``python -m compress.train`` from the repository root with its own run dir and stage cache
    and returns the ``CompletedProcess`` (text output captured). The run dir used is attached
    as ``proc.run_dir``."""

    def run(*overrides: str, run_dir: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        cmd, full_env, run_dir = app_command(overrides, tmp_path_factory.mktemp("app"), run_dir, env)
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        proc.run_dir = run_dir  # type: ignore[attr-defined]
        return proc

    return run


@pytest.fixture(scope="module")
def run_apps(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, subprocess.CompletedProcess]]:
    """``run_apps({key: [overrides...]}, env=None)`` runs several app invocations concurrently
    (each as ``run_app`` would) and returns their ``CompletedProcess`` by key."""

    def run(jobs: dict[str, Sequence[str]], env: dict[str, str] | None = None,
            timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
        started = {}
        for key, overrides in jobs.items():
            base = tmp_path_factory.mktemp("app")
            cmd, full_env, run_dir = app_command(overrides, base, env=env)
            # output to files, not pipes: no process stalls on a full pipe while another is read
            with open(base / "stdout.txt", "w") as out, open(base / "stderr.txt", "w") as err:
                popen = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err)
            started[key] = (cmd, popen, base, run_dir)
        done = {}
        try:
            for key, (cmd, popen, base, run_dir) in started.items():
                popen.wait(timeout=timeout)
                proc = subprocess.CompletedProcess(cmd, popen.returncode, (base / "stdout.txt").read_text(),
                                                   (base / "stderr.txt").read_text())
                proc.run_dir = run_dir  # type: ignore[attr-defined]
                done[key] = proc
        finally:
            for _, popen, _, _ in started.values():
                if popen.poll() is None:
                    popen.kill()
                    popen.wait()
        return done

    return run


@pytest.fixture
def calibrate_activations() -> Callable[..., None]:
    """``calibrate_activations(model, abits, learn=False, batches=2)`` installs ``abits``-bit
    activation quantizers in a CIFAR ResNet and calibrates their ranges, as the callback does
    before a stage, on ``batches`` batches of 32 random images."""
    from types import SimpleNamespace

    from compress.actquant import ActivationQuantCallback
    from compress.module import Classifier

    def calibrate(model: torch.nn.Module, abits: int, learn: bool = False, batches: int = 2) -> None:
        callback = ActivationQuantCallback(abits, learn, calibration=64)
        module = Classifier(model)
        callback.setup(None, module, "fit")  # type: ignore[arg-type]
        data = [(torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long)) for _ in range(batches)]
        trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: data),
                                  strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
        callback.on_test_start(trainer, module)  # type: ignore[arg-type]

    return calibrate
