"""Run and stage hashes, and run dirs, of ResNet-20 configs are pinned: finished runs and cached
pruning stages (published ones, and a long reproduction being resumed) must stay valid when
options or models are added. The values were computed before the model family existed."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from compress.checkpoint import source_id
from compress.config import config_hash
from compress.stages import stage_key
from conftest import Compose

URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th"




# (overrides, trainer.precision, config hash, pruning-stage key or None); weights from the URL
PINNED_URL = [
    (["quant=none", "trainer.max_epochs=0"], "32-true", "a95fe60983625fef", None),
    (["experiment=table3_2", "quant=asym", "nbits=3"], "bf16-mixed", "e81d0d20da103f1a", None),
    (["prune=global", "quant=asym", "nbits=4", "budget=smoke"], "32-true", "d9865cc0fc06f2ff", "da280b7c25b3d54e"),
    (["experiment=table3_1", "prune=global"], "bf16-mixed", "fc8a1838509844fa", "5251f9793c27d4ef"),
]
# The same for published runs (multirun/published/{full,strong-smoke}), weights from the local file
PINNED_FILE = [
    (["quant=asym", "nbits=2", "experiment=table3_2", "budget=full"], "bf16-mixed", "c509ddb6696daa15", None),
    (["prune=global", "quant=asym", "nbits=4", "experiment=table3_4_strong", "budget=smoke"], "32-true",
     "c21ffd66df7184d0", "df6500945dd93665"),
]


def hashes(cfg: DictConfig) -> tuple[str, str | None]:
    key = stage_key(cfg, source_id(cfg.model.pretrained)) if cfg.prune.method != "none" else None
    return config_hash(cfg), key


@pytest.mark.parametrize(("overrides", "precision", "run", "stage"), PINNED_URL)
def test_resnet20_hashes_are_pinned(hydra_compose: Compose, overrides: list[str], precision: str, run: str,
                                    stage: str | None) -> None:
    cfg = hydra_compose([*overrides, f"model.pretrained={URL}", f"trainer.precision={precision}"])
    assert hashes(cfg) == (run, stage)
    explicit = hydra_compose([*overrides, "model=resnet20", f"model.pretrained={URL}", f"trainer.precision={precision}"])
    assert hashes(explicit) == (run, stage)


@pytest.mark.parametrize(("overrides", "precision", "run", "stage"), PINNED_FILE)
def test_published_resnet20_hashes_are_pinned(hydra_compose: Compose, pretrained: Path, overrides: list[str],
                                              precision: str, run: str, stage: str | None) -> None:
    cfg = hydra_compose([*overrides, f"model.pretrained={pretrained}", f"trainer.precision={precision}"])
    assert hashes(cfg) == (run, stage)


def test_resnet20_run_dirs_are_pinned(hydra_compose: Compose) -> None:
    cfg = hydra_compose(["experiment=table3_2", "quant=asym", "nbits=3"], return_hydra_config=True)
    assert (cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir) == ("multirun/table3_2/full", "nbits=3,quant=asym")
    cfg = hydra_compose(["prune=global", "budget=smoke"], return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/default/smoke/prune=global"
