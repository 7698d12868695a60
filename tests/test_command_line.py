"""Mistakes on the command line a newcomer makes in the first hour: each is one line
``error: ...`` naming the value and the fix that works, exit status 2, no run dir left behind.
An option that changes nothing in the chosen setting is refused; a misspelt key lists the valid
ones (not Hydra's ``+key=`` hint); a missing optional extra names its ``pip install``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compress import export
from compress.config import check_effect, validate
from compress.export.cli import main as export_main
from compress.inputs import instantiate_data
from compress.loggers import check_loggers
from compress.train import build_methods

REPO = Path(__file__).resolve().parents[1]
PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit": "hydra_plugins.hydra_submitit_launcher",
           "optuna": "hydra_plugins.hydra_optuna_sweeper"}


def effect_error(hydra_compose, overrides: list[str]) -> str | None:
    """:func:`check_effect`'s message for a single run of ``overrides`` (None: accepted)."""
    cfg: DictConfig = hydra_compose(overrides, return_hydra_config=True)
    try:
        check_effect(cfg, list(cfg.hydra.overrides.task), dict(cfg.hydra.runtime.choices))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("overrides, message", [
    (["quant=none", "nbits=3"], "nbits=3 has no effect with quant=none: drop it or choose quant=sym|asym"),
    (["nbits=3"], "nbits=3 has no effect with quant=none: drop it or choose quant=sym|asym"),
    (["prune=oneshot", "ramp_epochs=5"], "ramp_epochs=5 has no effect with prune=oneshot: drop it or choose "
                                         "prune=iterative|global"),
    (["prune=channel", "ramp_epochs=5"], "ramp_epochs=5 has no effect with prune=channel: drop it or choose "
                                         "prune=iterative|global"),
    (["ramp_epochs=5"], "ramp_epochs=5 has no effect with prune=none: drop it or choose prune=iterative|global"),
    (["+prune.sparsity=0.5"], "prune.sparsity=0.5 has no effect with prune=none: drop it or choose "
                              "prune=channel|global|iterative|oneshot"),
    (["+distill.alpha=0.5"], "distill.alpha=0.5 has no effect with distill=none: drop it or choose distill=kd"),
    (["quant=sym", "quant.nbits=3", "nbits=5"], "nbits=5 has no effect beside quant.nbits=3: drop one of them"),
])
def test_an_option_the_setting_ignores_is_refused(hydra_compose, overrides: list[str], message: str) -> None:
    assert effect_error(hydra_compose, overrides) == message


@pytest.mark.parametrize("overrides", [
    ["quant=sym", "nbits=3"], ["quant=asym", "nbits=2", "prune=global", "ramp_epochs=3"], ["prune=iterative", "ramp_epochs=2"],
    ["recipe=best"], ["experiment=channel"], ["budget=debug", "prune=oneshot"],
    ["prune=global", "prune.sparsity=0.9", "quant=asym", "quant.clip=mse", "distill=kd", "distill.alpha=0.5"],
])
def test_an_option_that_takes_effect_is_accepted(hydra_compose, overrides: list[str]) -> None:
    assert effect_error(hydra_compose, overrides) is None


def test_the_oneshot_ramp_message_names_fixes_that_work(hydra_compose) -> None:
    """Each fix the message names builds; the fix it used to name (raise trainer.max_epochs
    with prune=oneshot) does not."""
    with pytest.raises(ValueError) as e:
        build_methods(hydra_compose(["prune=oneshot", "prune.ramp_epochs=5", "budget=debug"]))
    assert str(e.value) == ("prune.ramp_epochs=5 is not allowed for prune=oneshot (it prunes once, at the start): drop "
                            "it, or for a ramp use prune=iterative with prune.ramp_epochs=2 or less, or "
                            "trainer.max_epochs=5 (or prune.epochs=5, where it is set)")
    for fix in (["prune=oneshot"], ["prune=iterative", "prune.ramp_epochs=2"],
                ["prune=iterative", "prune.ramp_epochs=5", "trainer.max_epochs=5"]):
        cfg = hydra_compose([*fix, "budget=debug"])
        validate(cfg)
        (method,), _ = build_methods(cfg)
        assert method.method == fix[0].split("=")[1]
    with pytest.raises(ValueError, match="not allowed for prune=oneshot"):
        build_methods(hydra_compose(["prune=oneshot", "prune.ramp_epochs=5", "budget=debug", "trainer.max_epochs=5"]))


def test_a_ramp_longer_than_the_stage_names_both_fixes(hydra_compose) -> None:
    with pytest.raises(ValueError) as e:
        build_methods(hydra_compose(["prune=iterative", "prune.ramp_epochs=5", "budget=debug"]))
    assert str(e.value).endswith(": use prune.ramp_epochs=2 or less, or trainer.max_epochs=5 (or prune.epochs=5, "
                                 "where it is set)")


def test_an_unknown_data_key_lists_the_arguments(hydra_compose) -> None:
    """``+key=`` under data reaches the data module's class, which lists what it takes (prune,
    quant, distill, model, optim, trainer: tests/test_app.py)."""
    data = OmegaConf.to_container(hydra_compose(["+data.batchsize=64"]).data, resolve=True)
    with pytest.raises(ValueError, match=r"^data\.batchsize is not an argument of compress\.data\.CIFAR10Data \(it "
                                         r"takes root, download, batch_size, "):
        instantiate_data(data)


# --- missing optional extras, in process -------------------------------------------------------


def test_tensorboard_without_its_package_names_the_extra(hydra_compose, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ValueError) as e:
        check_loggers(hydra_compose(["logger=tensorboard"]).logger)
    assert str(e.value) == 'logger=tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'


def test_channel_pruning_without_torch_pruning_names_the_extra(hydra_compose, resnet: nn.Module,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    (method,), _ = build_methods(hydra_compose(["prune=channel"]))
    with pytest.raises(ValueError, match=r"^prune=channel needs Torch-Pruning: pip install -e '\.\[channel\]'$"):
        method.prepare(resnet)  # before any data is read


def test_onnx_export_without_onnx_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                  tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.delitem(sys.modules, "compress.export.onnx_model", raising=False)
    monkeypatch.delattr(export, "onnx_model", raising=False)  # else `from compress.export import onnx_model` finds it
    run = REPO / "multirun" / "published" / "mnv2" / "runs" / "mnv2_scratch" / "seed=0"
    assert export_main([str(run), "--onnx", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --onnx needs the onnx extra") and "pip install -e '.[onnx]'" in err
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


# --- the app, in subprocesses (each fails while composing or validating: seconds) --------------


@pytest.fixture(scope="module")
def hidden_plugins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python does not find the Hydra plugins of the launchers and search
    extras (a ``sitecustomize`` puts None in ``sys.modules`` for them), as if not installed."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({list(PLUGINS.values())!r}))\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def mistakes(run_apps, hidden_plugins: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    sweep = f"hydra.sweep.dir={tmp_path_factory.mktemp('sweep') / 'sweep'}"
    plain = run_apps({
        "nbits": ["quant=none", "nbits=3"],
        "plus_none": ["+prune.sparsity=0.5"],
        "typo": ["prune=global", "prune.sparsty=0.5"],
        "typo_none": ["prune.ramp_epochs=5"],
        "typo_sweep": ["-m", "quant=asym", "quant.nbts=2,3", f"hydra.sweep.dir={tmp_path_factory.mktemp('typo') / 'sweep'}"],
        "group": ["quant=foo"],
        "oneshot_ramp": ["prune=oneshot", "prune.ramp_epochs=5", "budget=debug"],
    })
    without = run_apps({
        "joblib": ["-m", "hydra/launcher=joblib", "quant=asym", "nbits=2,3", sweep],
        "slurm": ["-m", "hydra/launcher=slurm", "quant=asym", sweep],
        "search": ["hparams_search=frontier", sweep],
    }, env=hidden_plugins)
    return plain | without


def one_line_error(proc) -> str:  # noqa: ANN001 - a CompletedProcess with run_dir
    """The one ``error:`` line of a run that failed with exit status 2 and left no run dir."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not proc.run_dir.exists()
    return proc.stderr.strip()


@pytest.mark.parametrize("case, line", [
    ("nbits", "error: nbits=3 has no effect with quant=none: drop it or choose quant=sym|asym"),
    ("plus_none", "error: prune.sparsity=0.5 has no effect with prune=none: drop it or choose "
                  "prune=channel|global|iterative|oneshot"),
    ("typo", "error: prune.sparsty is not an option of prune: use one of method, scope, sparsity, ramp_epochs, epochs, "
             "layer_sparsity, min_density, layers"),
    ("typo_none", "error: prune.ramp_epochs has no effect with prune=none: drop it or choose "
                  "prune=channel|global|iterative|oneshot"),
    ("typo_sweep", "error: quant.nbts is not an option of quant: use one of mode, nbits, epochs, bn_recalibration, "
                   "clip, granularity, learn_range, abits, layer_nbits, layers"),
    ("group", "error: quant=foo is not an option of quant: use one of asym, none, sym"),
    ("oneshot_ramp", "error: prune.ramp_epochs=5 is not allowed for prune=oneshot (it prunes once, at the start): drop "
                     "it, or for a ramp use prune=iterative with prune.ramp_epochs=2 or less, or trainer.max_epochs=5 "
                     "(or prune.epochs=5, where it is set)"),
    ("joblib", 'error: hydra/launcher=joblib needs the hydra-joblib-launcher plugin, which is not installed: '
               'pip install -e ".[launchers]"'),
    ("slurm", 'error: hydra/launcher=submitit_slurm needs the hydra-submitit-launcher plugin, which is not installed: '
              'pip install -e ".[launchers]"'),
    ("search", 'error: hydra/sweeper=optuna needs the hydra-optuna-sweeper plugin, which is not installed: '
               'pip install -e ".[search]"'),
])
def test_the_app_says_one_line_with_the_fix(mistakes, case: str, line: str) -> None:
    assert one_line_error(mistakes[case]) == line
    assert "+prune" not in line and "Traceback" not in mistakes[case].stderr


def test_a_sweep_whose_command_line_does_not_compose_leaves_no_sweep_dir(mistakes) -> None:
    args = [str(a) for a in mistakes["typo_sweep"].args]
    sweep = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")))
    assert sweep.parent.is_dir() and not sweep.exists()  # no multirun.yaml, no empty report
