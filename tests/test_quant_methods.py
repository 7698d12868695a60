"""Per-channel and learned quantizer ranges end to end: composed with global pruning, asym
2-bit and distillation, a run's saved model, its metrics and its artifact agree. Real data
(``COMPRESS_DATA``, ``COMPRESS_PRETRAINED``), ``budget=debug``: about half a minute."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.checkpoint import load_checkpoint
from compress.export import load
from compress.layers import quantizable_layers
from compress.models import resnet20


def test_pruned_per_channel_learned_kd_run(run_app, data_root: Path, pretrained: Path) -> None:
    proc = run_app("prune=global", "quant=asym", "nbits=2", "quant.granularity=channel", "quant.learn_range=true",
                   "distill=kd", "budget=debug", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = proc.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["choices"]["granularity"] == "channel"
    assert metrics["max_distinct_values_per_channel"] <= 4 < metrics["max_distinct_values"]

    ckpt = load_checkpoint(str(run / "model.pt"))
    model = resnet20()
    model.load_state_dict(ckpt.state_dict)
    convs = quantizable_layers(model)
    grids = ckpt.meta["quant"]["grids"]
    for name, conv in convs.items():
        w = conv.weight.detach()
        assert max(torch.unique(c[c != 0]).numel() for c in w) <= 4, name
        assert (w[~ckpt.masks[name]] == 0).all(), name  # pruned weights are exactly zero
        scale, offset = (torch.tensor(grids[f"{name}.weight"][k]).view(-1, 1, 1, 1) for k in ("scale", "offset"))
        assert len(scale) == w.shape[0]
        codes = torch.round((w - offset) / scale).clamp(0, 3)
        assert torch.equal(torch.where(w == 0, 0.0, codes * scale + offset), w), name  # on its recorded grid
    assert metrics["distinct_values_per_channel"] == {
        n: max(torch.unique(c[c != 0]).numel() for c in m.weight.detach()) for n, m in convs.items()}
    assert metrics["sparsity"]["overall"] >= 0.8

    reloaded = load(run / "model.cpk")
    assert (run / "model.cpk").read_bytes()[4:6] == b"\x02\x00"  # the per-channel artifact version
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))
