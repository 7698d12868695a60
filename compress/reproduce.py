"""Reproduce every seed table in order and publish one report: ``python -m compress.reproduce``.

    python -m compress.reproduce --budget smoke            # a CPU machine: minutes a table
    python -m compress.reproduce --budget full             # the seed's epochs (use a GPU)
    python -m compress.reproduce --budget full -- trainer=gpu compile=true
    python -m compress.reproduce --tables table3_2_bnrecal --out multirun/published/bnrecal   # a stronger recipe

Runs ``experiment=table3_1`` .. ``table3_4`` (3.1 first: its global-pruning stage is reused
from the stage cache by 3.4), each a Hydra multirun under ``multirun/<table>/<budget>/``
(finished runs are skipped, so an interrupted reproduction resumes). Then copies every run's
``metrics.json`` and ``.hydra/`` config into ``<out>/runs/`` and writes ``<out>/report.md``
from those copies, with the command, budget, hardware, commit and wall time in its header:
the published report and the numbers it cites travel together.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from compress.report import write_report
from compress.train import hardware

CONF = Path(__file__).resolve().parents[1] / "conf"
TABLES = ("table3_1", "table3_2", "table3_3", "table3_4")
# Stronger recipes, run only when named in --tables (each beside the seed-faithful table it extends).
RECIPES = ("table3_2_bnrecal", "table3_2_strong", "table3_3_strong", "table3_4_strong")
CHOICES = TABLES + RECIPES


def git_commit(out: Path) -> str:
    """The checkout's commit (with ``+dirty`` if it has uncommitted changes outside ``out``,
    where the report is written), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){out}"], capture_output=True, text=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table_overrides(table: str, budget: str, overrides: list[str]) -> list[str]:
    """The app's overrides that run ``table`` at ``budget``."""
    return [f"experiment={table}", f"budget={budget}", *overrides]


def sweep_keys(table: str) -> set[str]:
    """The keys ``conf/experiment/<table>.yaml`` sweeps over (``hydra.sweeper.params``), or
    those of the experiment it extends (its first ``defaults`` entry) if it sets none."""
    exp = yaml.safe_load((CONF / "experiment" / f"{table}.yaml").read_text())
    params = (exp.get("hydra") or {}).get("sweeper", {}).get("params")
    if params is None:
        return sweep_keys(next(d for d in exp["defaults"] if d != "_self_"))
    return set(params)


def collect(sweep: Path, dest: Path, launched: list[str], swept: set[str]) -> int:
    """Copy the ``metrics.json`` (if any) and ``.hydra/`` of each run in ``sweep`` that this
    command launched (its overrides are ``launched`` plus swept keys only) into ``dest``."""
    n = 0
    for hydra_dir in sorted(sweep.glob("*/.hydra")):
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
        rest = [o for o in overrides if o not in launched]
        if not set(launched) <= set(overrides) or any(o.split("=", 1)[0] not in swept for o in rest):
            continue  # launched with other overrides: not part of this reproduction
        run, target = hydra_dir.parent, dest / hydra_dir.parent.name
        shutil.copytree(hydra_dir, target / ".hydra", dirs_exist_ok=True)
        if (run / "metrics.json").is_file():
            shutil.copy2(run / "metrics.json", target / "metrics.json")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=("smoke", "full"), default="smoke")
    p.add_argument("--tables", default=",".join(TABLES),
                   help=f"comma-separated subset of {', '.join(CHOICES)} (default: the seed's four)")
    p.add_argument("--out", type=Path, help="where the report goes (default: multirun/reproduce/<budget>)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every table (after --)")
    a = p.parse_args(argv)
    tables = [t.strip() for t in a.tables.split(",")]
    unknown = [t for t in tables if t not in CHOICES]
    if unknown:
        print(f"error: --tables {','.join(unknown)} is not allowed: use {', '.join(CHOICES)}", file=sys.stderr)
        return 2
    out = a.out or Path("multirun/reproduce") / a.budget
    t0, commit = time.time(), git_commit(out)
    failed = []
    for table in tables:
        cmd = [sys.executable, "-m", "compress.train", *table_overrides(table, a.budget, a.overrides)]
        print("+", shlex.join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(table)
    wall = time.time() - t0
    shutil.rmtree(out / "runs", ignore_errors=True)
    copied = {t: collect(Path("multirun") / t / a.budget, out / "runs" / t, table_overrides(t, a.budget, a.overrides), sweep_keys(t))
              for t in tables}
    command = shlex.join(["python", "-m", "compress.reproduce", *(argv if argv is not None else sys.argv[1:])])
    hw = hardware()
    notes = [f"- Command: `{command}` at commit `{commit}`, budget `{a.budget}`.",
             f"- Machine: {hw['device']}, {hw['threads']} threads; torch {hw['torch']}; wall time of this reproduction {wall / 60:.1f} min "
             "(runs already finished before it started were skipped, see their own wall times).",
             f"- Runs copied into `runs/`: {', '.join(f'{t} {n}' for t, n in copied.items())}."]
    if failed:
        notes.append(f"- **Incomplete**: runs of {', '.join(failed)} failed; they are listed as missing below.")
    report = write_report([out / "runs"], out, notes)
    print(f"report written to {report}")
    if failed:
        print(f"error: {', '.join(failed)} failed (see above); finished runs are kept, re-run to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
