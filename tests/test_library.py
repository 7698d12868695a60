"""The README's library example runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The python block after the ``<!-- library-example -->`` marker in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- library-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no library example"
    return match.group(1)


def test_readme_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 - the documented example
    out = capsys.readouterr().out
    assert re.fullmatch(r"[\d,]+ bytes \([\d.]+x smaller\), sparsity 0\.80, at most \d+ values a layer\n", out), out
    small, model = scope["small"], scope["model"]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(small(x), model.eval()(x))  # the saved network computes what the baked one does
    assert (tmp_path / "mnv2.cpk").stat().st_size == scope["report"]["compressed_bytes"]
    from compress import distinct_values_per_channel

    per_channel = distinct_values_per_channel(model)  # the baked model knows its quantized layers
    assert len(per_channel) == 51 and max(per_channel.values()) <= 16


def test_public_api_names() -> None:
    import compress

    for name in compress.__all__:
        assert getattr(compress, name) is not None, name
    assert compress.PruningCallback.stage == "prune" and compress.QuantizationCallback.stage == "quant"
