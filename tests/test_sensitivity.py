"""Per-layer sensitivity sweeps (``experiment=sensitivity_prune|sensitivity_quant``): the cells,
their weights (the pipeline's), the partial forward (bit for bit the full one), the ranking, the
resolver that seeds per-layer bit widths, and the app's outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.data import normalize
from compress.layers import quantizable_layers, prunable_layers
from compress.models import resnet32
from compress.prune import PruningCallback
from compress.quant import QuantizationCallback
from compress.sensitivity import (FIELDS, Cell, accuracies, cell_weight, cells_of, evaluate, limit_batches, parts, ranking,
                                  sensitive_widths)

PRUNE = {"kind": "prune", "settings": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "layers": "all"}
QUANT = {"kind": "quant", "settings": [2, 3, 4, 5, 6], "modes": ["sym", "asym"], "layers": "all"}


def random_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_the_issues_grids_of_cells(resnet: nn.Module) -> None:
    prune, quant = cells_of(PRUNE, resnet), cells_of(QUANT, resnet)
    assert len(prune) == 20 * 6 and len({(c.layer, c.setting) for c in prune}) == 120
    assert {c.layer for c in prune} == set(prunable_layers(resnet))
    assert len(quant) == 18 * 5 * 2 and {c.layer for c in quant} == set(quantizable_layers(resnet))
    assert {c.method for c in quant} == {"sym", "asym"} and {c.setting for c in quant} == {2, 3, 4, 5, 6}
    assert len(cells_of({**QUANT, "layers": ["layer3.2.conv2"]}, resnet)) == 10
    assert len(cells_of(PRUNE, resnet32())) == 32 * 6


@pytest.mark.parametrize(("spec", "message"), [
    ({**PRUNE, "kind": "both"}, "sensitivity.kind='both' is not allowed: use one of prune, quant"),
    ({**PRUNE, "settings": [1.2]}, "sensitivity.settings=1.2 is not allowed"),
    ({**QUANT, "settings": [1]}, "sensitivity.settings=1 is not allowed: nbits must be an integer in 2..8"),
    ({**QUANT, "modes": ["int"]}, "quantization mode 'int' is not allowed"),
    ({**QUANT, "layers": ["conv1"]}, "sensitivity.layers=['conv1'] is not allowed: use all, or some of layer1.0.conv1"),
    ({**PRUNE, "settings": []}, "sensitivity.settings is empty"),
])
def test_bad_sweeps_are_one_clear_error(resnet: nn.Module, spec: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        cells_of(spec, resnet)
    assert str(err.value).startswith(message)


def test_parts_compose_to_the_forward(resnet: nn.Module) -> None:
    x = torch.randn(8, 3, 32, 32)
    resnet.eval()
    out = x
    for _, f in parts(resnet):
        out = f(out)
    assert torch.equal(out, resnet(x))
    held = [n for names, _ in parts(resnet) for n in names]
    assert sorted(held) == sorted(prunable_layers(resnet))


@pytest.mark.parametrize("cell", [Cell("layer2.1.conv1", "prune", 0.9), Cell("linear", "prune", 0.5),
                                  Cell("layer1.0.conv2", "sym", 3), Cell("layer3.2.conv2", "asym", 2)])
def test_a_cells_weight_is_the_pipelines(resnet: nn.Module, cell: Cell) -> None:
    """The same layer pruned/quantized alone by the training pipeline's callbacks."""
    w = resnet.get_submodule(cell.layer).weight.detach().clone()
    if cell.method == "prune":
        PruningCallback(0.0, "layer", layer_sparsity={cell.layer: cell.setting}).install(resnet)
    else:  # every block conv quantized; only the cell's layer is compared
        QuantizationCallback(cell.method, cell.setting).install(resnet)
    assert torch.equal(cell_weight(w, cell), resnet.get_submodule(cell.layer).weight)


def test_evaluate_matches_a_plain_forward_with_the_layer_replaced(resnet: nn.Module) -> None:
    images, labels = random_images(50)
    cells = [Cell("conv1", "prune", 0.8), Cell("layer2.0.conv1", "asym", 2), Cell("linear", "prune", 0.95)]
    dense, right = evaluate(resnet, cells, images, labels, batch=16)
    x = normalize(images)
    with torch.inference_mode():
        assert torch.equal(dense, resnet.eval()(x).argmax(1) == labels)
        for cell, r in zip(cells, right):
            m = resnet.get_submodule(cell.layer)
            own = m.weight.detach().clone()
            m.weight.data = cell_weight(own, cell)
            assert torch.equal(r, resnet(x).argmax(1) == labels), cell
            m.weight.data = own
    assert torch.equal(dense, evaluate(resnet, [], images, labels, batch=50)[0])  # unchanged model left behind


def test_accuracies_split_into_the_seeded_halves() -> None:
    right = torch.zeros(10_000, dtype=torch.bool)
    right[:5_000] = True
    acc = accuracies(right, 10_000)
    assert acc["acc"] == 0.5 and 0.45 < acc["acc_search"] < 0.55
    assert acc["acc_search"] + acc["acc_report"] == pytest.approx(1.0)
    assert limit_batches(1.0, 50) == 50 and limit_batches(2, 50) == 2 and limit_batches(0.5, 50) == 25


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def test_ranking_and_the_widths_it_seeds_use_the_search_half(tmp_path: Path) -> None:
    rows = []
    for layer, search, report in (("layer1.0.conv1", 0.5, 0.9), ("layer2.0.conv1", 0.7, 0.1), ("layer3.0.conv1", 0.9, 0.2)):
        for method in ("sym", "asym"):
            rows.append({"layer": layer, "method": method, "setting": 2, "weights": 1, "acc": (search + report) / 2,
                         "acc_search": search, "acc_report": report, "drop": 0})
    assert [n for n, _ in ranking(rows, "acc_search")] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    assert [n for n, _ in ranking(rows, "acc_report")][0] == "layer2.0.conv1"
    path = write_csv(tmp_path / "sensitivity.csv", rows)
    assert sensitive_widths(str(path), 2, 3, 2) == {"layer1.0.conv1": 5, "layer2.0.conv1": 5}
    assert sensitive_widths(str(path), 1, 7, 2) == {"layer1.0.conv1": 8}
    assert sensitive_widths(str(tmp_path / "missing.csv"), 0, 4, 2) == {}
    with pytest.raises(FileNotFoundError, match="missing.csv: no sensitivity CSV"):
        sensitive_widths(str(tmp_path / "missing.csv"), 2, 4, 2)


def read(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "sensitivity.csv") as f:
        return list(csv.DictReader(f))


PRUNE_LAYERS = "sensitivity.layers=[conv1,layer3.2.conv2,linear]"


def test_sensitivity_experiments_write_csv_heatmap_and_ranking(run_apps, run_app, data_root: Path,
                                                              pretrained: Path) -> None:
    """Both experiments at budget=debug (400 test images), a few layers each: one CSV row per
    cell, the heatmap, the ranked table; a second launch skips the finished sweep."""
    env = {"OMP_NUM_THREADS": "1"}
    procs = run_apps({"prune": ["experiment=sensitivity_prune", "budget=debug", PRUNE_LAYERS],
                      "quant": ["experiment=sensitivity_quant", "budget=debug",
                                "sensitivity.layers=[layer3.2.conv2]"]}, env=env)
    for kind, rows_expected in (("prune", 3 * 6), ("quant", 1 * 5 * 2)):
        proc, figure = procs[kind], f"sensitivity_{kind}.png"
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = read(proc.run_dir)
        assert len(rows) == rows_expected and list(rows[0]) == list(FIELDS)
        assert (proc.run_dir / figure).read_bytes()[:4] == b"\x89PNG"
        assert oct((proc.run_dir / figure).stat().st_mode & 0o777) == "0o644"
        report = (proc.run_dir / "report.md").read_text()
        assert "## Most sensitive layers" in report and f"![{figure}]({figure})" in report
        summary = json.loads((proc.run_dir / "sensitivity.json").read_text())
        assert summary["test_images"] == 400 and summary["cells"] == rows_expected
        ranked = [ln.split("`")[1] for ln in report.splitlines() if ln.startswith("| 1 |")]
        assert ranked and ranked[0] in {r["layer"] for r in rows}
    again = run_app("experiment=sensitivity_prune", "budget=debug", PRUNE_LAYERS, run_dir=procs["prune"].run_dir, env=env)
    assert again.returncode == 0 and "already finished, skipping" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_cell_is_the_pipelines_run_with_that_layer_setting(run_app, data_root: Path, pretrained: Path) -> None:
    """The in-process cell and ``compress.train`` with the same per-layer sparsity, on all
    10,000 test images: the same accuracy, to the image."""
    env = {"OMP_NUM_THREADS": "1"}
    sweep = run_app("experiment=sensitivity_prune", "sensitivity.layers=[layer3.2.conv2]", "sensitivity.settings=[0.9]",
                    env=env)
    pipeline = run_app("prune=oneshot", "prune.sparsity=0", "prune.layer_sparsity={layer3.2.conv2:0.9}",
                       "trainer.max_epochs=0", env=env)
    assert sweep.returncode == 0 and pipeline.returncode == 0, sweep.stderr[-2000:] + pipeline.stderr[-2000:]
    (cell,) = read(sweep.run_dir)
    assert json.loads((pipeline.run_dir / "metrics.json").read_text())["test_acc"] == float(cell["acc"])


def test_sensitivity_rejects_a_bad_layer_in_one_line(run_app) -> None:
    proc = run_app("experiment=sensitivity_quant", "sensitivity.layers=[linear]")
    assert proc.returncode == 2 and proc.stderr.startswith("error: sensitivity.layers=['linear'] is not allowed")
    assert len(proc.stderr.strip().splitlines()) == 1
