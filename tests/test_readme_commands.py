"""The README's first commands run as written, from a fresh directory, and say what the README
says: the evaluation-only command gives the accuracy the README quotes, the debug run finishes
with its results where the README says single runs land. (Every documented command is also
composed in ``test_docs.py``.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def first_commands() -> list[str]:
    """The commands of the README's "First three commands" block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## First three commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "the README has a 'First three commands' code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` (``python -m ...``) run with this interpreter in ``cwd``, the stage cache there too."""
    args = shlex.split(command)
    assert args[:2] == ["python", "-m"]
    env = {**os.environ, "COMPRESS_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("COMPRESS_RUNS", None)
    return subprocess.run([sys.executable, *args[1:], "progress=log"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_readme_evaluation_gives_the_accuracy_it_quotes(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    command = first_commands()[0]
    assert "trainer.max_epochs=0" in command
    proc = run_as_written(command, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [metrics] = list((tmp_path / "outputs").rglob("metrics.json"))  # single runs land in outputs/
    quoted = re.search(r"test accuracy (0\.\d{4})", (REPO / "README.md").read_text())
    assert quoted and f"{json.loads(metrics.read_text())['test_acc']:.4f}" == quoted.group(1)


def test_readme_debug_run_finishes(tmp_path: Path, data_root: Path, pretrained: Path) -> None:
    command = first_commands()[1]
    assert "budget=debug" in command
    proc = run_as_written(command, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run] = [p.parent for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert {"model.pt", "model.cpk", "train.log"} <= {p.name for p in run.iterdir()}
    assert run.relative_to(tmp_path / "outputs").parts[:2] == ("default", "debug")
