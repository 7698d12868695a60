"""The Hydra app: every config group combination composes and validates; bad input fails early
with a message naming the bad value, a non-zero exit and no metrics.json."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from compress.config import config_hash, validate
from compress.train import build_methods
from compress.models import resnet20

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PRUNE = ("none", "oneshot", "iterative", "global", "channel")
QUANT = ("none", "sym", "asym")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
BUDGETS = sorted(p.stem for p in (CONF / "budget").glob("*.yaml"))



def check(cfg: DictConfig) -> None:
    validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["prune"]["method"] in PRUNE and resolved["quant"]["mode"] in QUANT
    assert len(config_hash(cfg)) == 16


def test_config_groups_found() -> None:
    assert {"table3_1", "table3_2", "table3_3", "table3_4"} <= set(EXPERIMENTS)
    assert {"full", "smoke"} <= set(BUDGETS)
    assert {p.stem for p in (CONF / "prune").glob("*.yaml")} == set(PRUNE)
    assert {p.stem for p in (CONF / "quant").glob("*.yaml")} == set(QUANT)


@pytest.mark.parametrize("budget", BUDGETS)
def test_every_prune_quant_combination_validates(hydra_compose, budget: str) -> None:
    hashes = set()
    for prune, quant in itertools.product(PRUNE, QUANT):
        cfg = hydra_compose([f"prune={prune}", f"quant={quant}", f"budget={budget}"])
        check(cfg)
        assert cfg.prune.method == prune and cfg.quant.mode == quant
        hashes.add(config_hash(cfg))
    assert len(hashes) == len(PRUNE) * len(QUANT)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_job_validates(hydra_compose, experiment: str, budget: str) -> None:
    """Compose each job of the experiment's sweep (its sweeper params expanded) and validate it;
    an experiment that is one job (a sensitivity sweep, in one process) is that job."""
    base = [f"experiment={experiment}", f"budget={budget}"]
    hcfg = hydra_compose(base, return_hydra_config=True)
    params = OmegaConf.to_container(hcfg.hydra.sweeper.params) if hcfg.hydra.sweeper.params else {}
    assert params or "sensitivity" in hcfg, f"{experiment} sweeps nothing"
    axes = [[f"{k}={v.strip()}" for v in str(values).split(",")] for k, values in params.items()]
    jobs = list(itertools.product(*axes))
    hashes = set()
    for job in jobs:
        cfg = hydra_compose([*base, *job])
        check(cfg)
        assert cfg.name == experiment
        hashes.add(config_hash(cfg))
    assert len(hashes) == len(jobs)  # every job of the sweep is a distinct run


def test_budgets_differ(hydra_compose) -> None:
    full, smoke = hydra_compose(["budget=full"]), hydra_compose(["budget=smoke"])
    assert full.trainer.max_epochs == 20 and full.ramp_epochs == 10
    assert smoke.trainer.max_epochs < full.trainer.max_epochs
    assert config_hash(full) != config_hash(smoke)


def test_config_hash_follows_the_weights_content_not_paths(hydra_compose, tmp_path: Path) -> None:
    a, b = random_checkpoint(tmp_path / "a.th"), tmp_path / "b.th"
    b.write_bytes(a.read_bytes())
    ha = config_hash(hydra_compose([f"model.pretrained={a}", "data.root=/x"]))
    assert config_hash(hydra_compose([f"model.pretrained={b}", "data.root=/y"])) == ha  # same inputs
    torch.manual_seed(1)
    torch.save({"state_dict": resnet20().state_dict()}, a)
    assert config_hash(hydra_compose([f"model.pretrained={a}", "data.root=/x"])) != ha  # new weights, same path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nbits=9"], "nbits"),
        (["nbits=1"], "nbits"),
        (["prune=global", "prune.sparsity=1.5"], "prune.sparsity"),
        (["prune=iterative", "ramp_epochs=0"], "ramp_epochs"),
        (["prune=oneshot", "prune.ramp_epochs=2"], "prune.ramp_epochs=2 is not allowed for prune=oneshot"),
        (["prune=iterative", "trainer.max_epochs=3", "prune.ramp_epochs=5"], "ramp_epochs"),
        (["progress=loud"], "progress='loud' is not allowed"),
        pytest.param(["logger=wandb"], "logger=wandb needs the wandb package: pip install wandb",
                     marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")),
        (["trainer.max_epochs=-1"], "trainer.max_epochs"),
        (["data.eval_batch_size=0"], "data.eval_batch_size"),
        (["quant=asym", "quant.bn_recalibration=-1"], "quant.bn_recalibration"),
        (["quant=sym", "quant.clip=max"], "quant.clip='max' is not allowed"),
        (["quant=asym", "quant.granularity=row"], "quant.granularity='row' is not allowed: use one of tensor, channel"),
        (["quant=sym", "quant.learn_range=yes"], "quant.learn_range='yes' is not allowed: use true or false"),
        (["+optim.lrr=0.1"], "optim.lrr is not an option of optim: use one of lr, momentum"),
        (["+model.foo=1"], "model.foo is not an option of model: use one of name, net, pretrained"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch is not an option of trainer"),
        (["prune=global", "+prune.sparsty=0.5"], "prune.sparsty is not an option of prune"),
        (["quant=asym", "+quant.nbit=3"], "quant.nbit is not an option of quant"),
        (["distill=kd", "+distill.alpah=0.5"], "distill.alpah is not an option of distill"),
    ],
)
def test_validate_rejects_composed(hydra_compose, overrides: list[str], message: str) -> None:
    """Caught before any data or weights are read: by validate, or by the method's own class."""
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cfg = hydra_compose(overrides)
        validate(cfg)
        build_methods(cfg)


def test_quant_options_at_their_default_keep_the_hash(hydra_compose) -> None:
    base = ["prune=global", "quant=asym", "nbits=2"]
    default = config_hash(hydra_compose(base))
    assert config_hash(hydra_compose([*base, "quant.granularity=tensor", "quant.learn_range=false"])) == default
    channel, learned = "quant.granularity=channel", "quant.learn_range=true"
    others = {config_hash(hydra_compose([*base, *o])) for o in ([channel], [learned], [channel, learned])}
    assert len(others) == 3 and default not in others


# --- the app itself, in subprocesses -----------------------------------------------------
# Every bad-input case fails before any image is read or any training starts, so they are
# cheap; they run concurrently (one Python start-up each) and each test checks its own case.


def fake_cifar_root(root: Path) -> Path:
    """Empty files with CIFAR-10's names: enough for the early data check
    (``CIFAR10Data.check``), which runs before any image is read."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(b"")
    return root


def random_checkpoint(path: Path, num_classes: int = 10) -> Path:
    """A valid checkpoint in the published format (random ResNet-20 weights)."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in resnet20(num_classes).state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs that are bad in one way only, so each case fails on its own check whatever
    order ``compress.train.run`` checks the data root and the weights in."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "empty").mkdir()
    (base / "garbage.th").write_bytes(b"this is not a checkpoint \x00\x01\x02" * 10)
    return {"empty": base / "empty", "fake_data": fake_cifar_root(base / "data"),
            "garbage": base / "garbage.th", "weights": random_checkpoint(base / "random.th"),
            "weights100": random_checkpoint(base / "random100.th", num_classes=100)}


@pytest.fixture(scope="module")
def failures(run_apps, paths: dict[str, Path]) -> dict:
    # no network for the download cases, whatever the machine has: proxies that refuse at once
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    return run_apps({
        "nbits": ["quant=asym", "nbits=9"],
        "quant": ["quant=foo"],
        "prune": ["prune=foo"],
        "sparsity": ["prune=global", "prune.sparsity=1.5"],
        "data_root": [f"data.root={paths['empty']}", f"model.pretrained={paths['weights']}"],
        "garbage": [f"data.root={paths['fake_data']}", f"model.pretrained={paths['garbage']}"],
        "shape": [f"data.root={paths['fake_data']}", f"model.pretrained={paths['weights100']}"],
        "fp_dtype": ["export_fp_dtype=fp16"],
        "nothing": ["quant=asym", "quant.layers.types=[ConvTranspose2d]"],
        "corrupt_data": [f"data.root={paths['fake_data']}", f"model.pretrained={paths['weights']}", "trainer.max_epochs=0"],
        "offline": [f"data.root={paths['fake_data']}", "model.pretrained=https://127.0.0.1:9/resnet20-12fca82f.th"],
        "download": [f"data.root={paths['empty']}", "data.download=true", f"model.pretrained={paths['weights']}"],
    }, env=offline)


def assert_failed(proc, *needles: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in output:\n{out}"
    assert not (proc.run_dir / "metrics.json").exists()
    assert not (proc.run_dir / "model.pt").exists()
    if proc.returncode == 2:  # our own one-line errors
        assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert not proc.run_dir.exists()  # a failed single run leaves no empty run dir behind
    return out


def test_bad_nbits(failures) -> None:
    proc = failures["nbits"]
    assert_failed(proc, "nbits", "2..8")
    assert "nbits=9" in proc.stderr and "2..8" in proc.stderr
    assert "Traceback" not in proc.stderr  # a user error is one line, not a traceback


@pytest.mark.parametrize("group, options", [("quant", QUANT), ("prune", PRUNE)])
def test_unknown_group_option(failures, group: str, options: tuple[str, ...]) -> None:
    """One line naming the bad option and the available ones (Hydra's own message is several)."""
    proc = failures[group]
    assert_failed(proc, f"{group}=foo")
    assert proc.returncode == 2
    assert proc.stderr == f"error: {group}=foo is not an option of {group}: use one of {', '.join(sorted(options))}\n"


def test_bad_sparsity(failures) -> None:
    assert_failed(failures["sparsity"], "prune.sparsity", "1.5")
    assert "Traceback" not in failures["sparsity"].stderr


def test_missing_data_root(failures, paths) -> None:
    assert_failed(failures["data_root"], "data.root", str(paths["empty"]))


def test_bad_pretrained(failures, paths) -> None:
    proc = failures["garbage"]
    assert_failed(proc, "model.pretrained", str(paths["garbage"]), "is not a checkpoint this tool can read")
    assert "weights_only" not in proc.stderr  # torch's advice to unpickle anything is the wrong fix here


def test_offline_download(failures, paths) -> None:
    proc = failures["download"]
    assert_failed(proc, "could not download CIFAR-10 into", str(paths["empty"]), "COMPRESS_DATA")
    assert proc.returncode == 2


def test_checkpoint_of_another_shape(failures, paths) -> None:
    proc = failures["shape"]
    assert_failed(proc, "model.pretrained", str(paths["weights100"]), "wrong shape", "linear.weight")
    assert "Traceback" not in proc.stderr


def test_bad_export_dtype(failures) -> None:
    proc = failures["fp_dtype"]
    assert_failed(proc, "export_fp_dtype='fp16'", "float32, float16")
    assert "Traceback" not in proc.stderr


def test_quant_on_a_model_with_nothing_to_quantize(failures) -> None:
    proc = failures["nothing"]
    assert_failed(proc, "quant=asym found nothing to quantize in ResNet", "widen quant.layers")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_corrupt_data_files(failures, paths) -> None:
    """Files with CIFAR-10's names pass the early check; torchvision's MD5 check then fails."""
    proc = failures["corrupt_data"]
    assert_failed(proc, "data.root", str(paths["fake_data"]), "corrupt or incomplete")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_unreachable_pretrained_url(failures) -> None:
    proc = failures["offline"]
    assert_failed(proc, "model.pretrained='https://127.0.0.1:9/", "could not be downloaded", "COMPRESS_PRETRAINED")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "compress.train", "-m", "quant=asym", "nbits=9,1", "trainer.max_epochs=0",
           f"hydra.sweep.dir={sweep}", f"stage_cache={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: nbits=9" in proc.stderr and "error: nbits=1" in proc.stderr, proc.stderr
    assert not list(sweep.rglob("metrics.json"))
    # Hydra skips on_multirun_end after a failed job; the report is still written, listing them
    report = (sweep / "report.md").read_text()
    assert "0 complete, 2 missing or incomplete" in report
    assert "`nbits=1,quant=asym,trainer.max_epochs=0`: unfinished" in report
    assert "`nbits=9,quant=asym,trainer.max_epochs=0`: unfinished" in report
