"""Reproduce every seed table in order and publish one report: ``python -m compress.reproduce``.

    python -m compress.reproduce --budget smoke            # a CPU machine: minutes a table
    python -m compress.reproduce --budget full --out multirun/published/full   # hours: resumable
    python -m compress.reproduce --budget full -- trainer=gpu compile=true
    python -m compress.reproduce --tables table3_2_bnrecal --out multirun/published/bnrecal   # a stronger recipe
    python -m compress.reproduce --budget full --tables table3_1_best,table3_4_best,table3_3_best,table3_4_best_90 --out multirun/published/best-full
    python -m compress.reproduce --budget full --out multirun/published/full --report-only   # publish what is done

Runs ``experiment=table3_1`` .. ``table3_4`` (3.1 first: its global-pruning stage is reused
from the stage cache by 3.4), each a Hydra multirun under ``$COMPRESS_RUNS/<table>/<budget>/``
(``<table>-<model>`` for a ``model=`` other than resnet20)
(default ``multirun/``). After each table it copies every run's ``metrics.json``, ``.hydra/``
config and packed ``model.cpk`` into ``<out>/runs/`` and rewrites ``<out>/report.md`` from
those copies, with the command, budget, hardware, commit and wall time in its header and the
runs not finished yet listed as missing: the published report and the numbers it cites travel
together, and a long reproduction can be published piece by piece.

Nothing finished is computed twice: a run whose ``metrics.json`` holds the same config hash is
skipped by ``compress.train``; runs present only in ``<out>/runs/`` (a fresh clone of a
published reproduction) are copied back into the sweep dir first, and a published single-stage
pruning run refills the stage cache (``$COMPRESS_CACHE``) that the quantization tables reuse.
A run killed mid-stage resumes from its last epoch's checkpoint in its run dir.
"""

from __future__ import annotations

import argparse
from importlib import resources
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from compress.checkpoint import save_checkpoint
from compress.config import DEFAULT_MODEL, model_tag
from compress.interrupt import Interrupted, stop_on_signals
from compress.layers import prunable_layers
from compress.models.weights import weights_dir
from compress.report import write_report
from compress.train import hardware

CONF = resources.files("compress.conf")  # conf/ of the checkout, shipped in the package
TABLES = ("table3_1", "table3_2", "table3_3", "table3_4")
# Stronger recipes, run only when named in --tables (each beside the seed-faithful table it extends).
RECIPES = ("table3_2_bnrecal", "table3_2_strong", "table3_3_strong", "table3_4_strong",
           "table3_1_best", "table3_3_best", "table3_4_best", "table3_4_best_90")
CHOICES = TABLES + RECIPES
RUN_FILES = ("metrics.json", "model.cpk")  # what a published run keeps besides its .hydra/ config
PORTABLE = ("metrics.json", ".hydra/hydra.yaml")  # run files that record the machine's paths (published without)


def runs_root() -> Path:
    """Where the sweeps write their run dirs: ``$COMPRESS_RUNS`` or ``multirun``."""
    return Path(os.environ.get("COMPRESS_RUNS", "multirun"))


def model_of(overrides: list[str]) -> str:
    """The ``model=`` the overrides choose (the last one wins, as in Hydra), else resnet20."""
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("model=")), DEFAULT_MODEL)


def sweep_dir(table: str, budget: str, overrides: list[str]) -> Path:
    """Where ``table``'s sweep writes its run dirs (``hydra.sweep.dir`` of ``conf/config.yaml``)."""
    return runs_root() / f"{table}{model_tag(model_of(overrides))}" / budget


def cache_root() -> Path:
    """The pruning-stage cache: ``$COMPRESS_CACHE`` or ``multirun/.stages`` (as ``conf/config.yaml``)."""
    return Path(os.environ.get("COMPRESS_CACHE", "multirun/.stages"))


def git_commit(out: Path) -> str:
    """The checkout's commit (with ``+dirty`` if it has uncommitted changes outside ``out``,
    where the report is written), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        top = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip())
        inside = out.resolve().is_relative_to(top.resolve())
        exclude = [f":(exclude){out.resolve().relative_to(top.resolve())}"] if inside else []
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude],
                               capture_output=True, text=True, check=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def task_overrides(overrides: list[str]) -> list[str]:
    """The overrides that configure the job, not Hydra (``hydra/launcher=joblib``,
    ``hydra.launcher.n_jobs=2``): only these show in a run's dir name and ``overrides.yaml``."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def table_overrides(table: str, budget: str, overrides: list[str]) -> list[str]:
    """The app's overrides that run ``table`` at ``budget``."""
    return [f"experiment={table}", f"budget={budget}", *overrides]


def _experiment(table: str) -> dict:
    return yaml.safe_load((CONF / "experiment" / f"{table}.yaml").read_text())


def sweep_params(table: str) -> dict[str, str]:
    """``hydra.sweeper.params`` of ``conf/experiment/<table>.yaml``, or of the experiment it
    extends (its first ``defaults`` entry) if it sets none."""
    exp = _experiment(table)
    params = (exp.get("hydra") or {}).get("sweeper", {}).get("params")
    if params is None:
        return sweep_params(next(d for d in exp["defaults"] if d != "_self_"))
    return {k: str(v) for k, v in params.items()}


def sweep_keys(table: str) -> set[str]:
    """The keys the experiment sweeps over."""
    return set(sweep_params(table))


def expected_runs(table: str, overrides: list[str]) -> list[str]:
    """The run dir names (Hydra's ``override_dirname``) of every job of ``table``'s sweep."""
    excluded = set(yaml.safe_load((CONF / "config.yaml").read_text())["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])
    extra = [o for o in task_overrides(overrides) if o.split("=", 1)[0].lstrip("+~") not in excluded]
    params = sweep_params(table)
    names = []
    for values in itertools.product(*(v.split(",") for v in params.values())):
        names.append(",".join(sorted([*extra, *(f"{k}={v.strip()}" for k, v in zip(params, values))])))
    return names


def machine_paths() -> list[tuple[str, str]]:
    """This machine's paths that run files record, with what each stands for, longest first: the
    data root (``$COMPRESS_DATA``), the weights' dir (``$COMPRESS_WEIGHTS``), the stage cache and
    the runs root where the environment sets them, and the checkout (the working directory),
    which published files name relatively (empty)."""
    named = {f"${v}": Path(os.environ[v]).expanduser() for v in ("COMPRESS_DATA", "COMPRESS_CACHE", "COMPRESS_RUNS")
             if os.environ.get(v)}
    weights = weights_dir()
    named |= {"$COMPRESS_WEIGHTS": weights} if weights else {}
    named[""] = Path.cwd()
    paths = {str(form): name for name, path in named.items() for form in (path.absolute(), path.resolve())
             if form.parent != form}  # never the file system's root
    return sorted(paths.items(), key=lambda item: -len(item[0]))


def portable(text: str, paths: list[tuple[str, str]]) -> str:
    """``text`` with each of ``paths`` (:func:`machine_paths`: path, what it stands for; empty:
    the checkout, made relative) replaced where a whole path component ends there."""
    for path, name in paths:
        if name:
            text = re.sub(re.escape(path) + r"(?![\w.-])", lambda _: name, text)
        else:
            text = re.sub(re.escape(path) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".", text)
    return text


def collect(sweep: Path, dest: Path, launched: list[str], swept: set[str], previous: Path | None = None) -> int:
    """Copy the ``metrics.json`` and ``model.cpk`` (if any) and ``.hydra/`` of each run in
    ``sweep`` that this command launched (its overrides are ``launched`` plus swept keys only)
    into ``dest``; returns how many finished runs were copied.

    A finished run already published in ``previous`` with the same ``metrics.json`` is copied
    from there: a later launch that skipped it has rewritten its ``.hydra/`` in ``sweep`` (Hydra
    writes it before the job sees it is done), and the published one is the config it ran with."""
    n = 0
    for hydra_dir in sorted(sweep.glob("*/.hydra")):
        overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
        rest = [o for o in overrides if o not in launched]
        if not set(launched) <= set(overrides) or any(o.split("=", 1)[0] not in swept for o in rest):
            continue  # launched with other overrides: not part of this reproduction
        run = hydra_dir.parent
        finished = (run / "metrics.json").is_file()
        kept = previous / run.name if previous else None
        if finished and kept and (kept / ".hydra").is_dir() and same_result(kept, run):
            run = kept
        copy_run(run, dest / run.name, with_files=finished)
        n += finished
    return n


def same_result(kept: Path, run: Path) -> bool:
    """Whether the published run ``kept`` holds the ``metrics.json`` of ``run``, as published
    (:func:`portable`)."""
    a, b = kept / "metrics.json", run / "metrics.json"
    return a.is_file() and b.is_file() and a.read_text() == portable(b.read_text(), machine_paths())


def copy_run(run: Path, target: Path, with_files: bool = True) -> None:
    """Copy a run's ``.hydra/`` config and (``with_files``) those of :data:`RUN_FILES` it has,
    the machine's paths in them replaced by what they stand for (:func:`portable`)."""
    shutil.copytree(run / ".hydra", target / ".hydra", dirs_exist_ok=True)
    for name in RUN_FILES if with_files else ():
        if (run / name).is_file():
            shutil.copy2(run / name, target / name)
    paths = machine_paths()
    for name in PORTABLE:
        if (target / name).is_file():
            (target / name).write_text(portable((target / name).read_text(), paths))


def restore(published: Path, sweep: Path) -> int:
    """Copy finished runs that exist only in ``published`` (a reproduction's ``runs/<table>``)
    back into the ``sweep`` dir, so ``compress.train`` finds and skips them; returns how many."""
    n = 0
    for metrics in sorted(published.glob("*/metrics.json")):
        run, target = metrics.parent, sweep / metrics.parent.name
        if (target / "metrics.json").is_file():
            continue
        copy_run(run, target)
        n += 1
    return n


def restore_stage(run: Path, cache: Path) -> bool:
    """Refill the stage cache from a finished single-stage pruning run (its final model is the
    stage's output): weights from ``model.cpk``, masks = its nonzero weights. Returns whether
    an entry was written."""
    from compress.export import load  # heavy; only needed here

    try:
        metrics = json.loads((run / "metrics.json").read_text())
        (stage,) = metrics["stages"]
        key = stage["cache_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not key or stage.get("name") != "prune" or (cache / key / "result.json").is_file() or not (run / "model.cpk").is_file():
        return False
    model = load(run / "model.cpk")
    masks = {n: m.weight.detach() != 0 for n, m in prunable_layers(model).items()}
    entry, tmp = cache / key, cache / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp / "model.pt", model, masks, {"stage": "prune", "restored_from": str(run)})
    (tmp / "result.json").write_text(json.dumps({**stage, "cached": False}, indent=1))
    shutil.rmtree(entry, ignore_errors=True)
    tmp.rename(entry)
    return True


def publish(out: Path, tables: list[str], budget: str, overrides: list[str], notes: list[str]) -> Path:
    """Re-collect every table's runs into ``<out>/runs/`` and write the report, listing the
    runs not started yet."""
    runs, staging = out / "runs", out / ".runs.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    copied, pending = {}, []
    for t in tables:
        dest = staging / t
        launched = table_overrides(t, budget, task_overrides(overrides))
        copied[t] = collect(sweep_dir(t, budget, overrides), dest, launched, sweep_keys(t), runs / t)
        pending += [f"{t}/{name}" for name in expected_runs(t, overrides) if not (dest / name / ".hydra").is_dir()]
    notes = [*notes, f"- Runs copied into `runs/`: {', '.join(f'{t} {n}' for t, n in copied.items())}."]
    shutil.rmtree(runs, ignore_errors=True)
    staging.rename(runs)
    return write_report([runs], out, notes, pending)


def finished_runs(sweep: Path) -> set[str]:
    """The run dirs of ``sweep`` that hold a ``metrics.json``."""
    return {m.parent.name for m in sweep.glob("*/metrics.json")}


def run_publishing(cmd: list[str], sweep: Path, publish_now: Callable[[], object], poll_s: float = 30.0) -> int:
    """Run ``cmd`` (a table's sweep) and call ``publish_now`` whenever a run of ``sweep``
    finishes while it runs; returns its exit status. SIGINT/SIGTERM raise
    :class:`~compress.interrupt.Interrupted` once the sweep has stopped (it keeps its last epoch)."""
    with stop_on_signals():
        return _watch(subprocess.Popen(cmd), sweep, publish_now, poll_s)


def _watch(proc: subprocess.Popen, sweep: Path, publish_now: Callable[[], object], poll_s: float) -> int:
    try:
        done = finished_runs(sweep)
        while proc.poll() is None:
            time.sleep(poll_s)
            now = finished_runs(sweep)
            if now - done:
                publish_now()
            done = now
    finally:  # never leave the sweep training on its own (a rerun would race it)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    return proc.returncode


def prepare(out: Path, tables: list[str], budget: str, overrides: list[str]) -> list[str]:
    """Restore every table already published in ``<out>/runs/`` (not only those to run) into
    its sweep dir and refill the stage cache from their pruning runs, so a reproduction run
    table by table skips what is done and reuses Table 3.1's pruning stage. Returns the tables
    the report covers: ``tables`` plus those published before, in ``CHOICES`` order."""
    reported = [t for t in CHOICES if t in tables or (out / "runs" / t).is_dir()]
    for t in reported:
        sweep = sweep_dir(t, budget, overrides)
        restored = restore(out / "runs" / t, sweep)
        refilled = sum(restore_stage(run, cache_root()) for run in sorted(sweep.glob("*")) if run.is_dir())
        if restored or refilled:
            print(f"{t}: {restored} finished runs restored from {out / 'runs' / t}, {refilled} pruning stages to the cache", flush=True)
    return reported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=("smoke", "full"), default="smoke")
    p.add_argument("--tables", default=",".join(TABLES),
                   help=f"comma-separated subset of {', '.join(CHOICES)} (default: the seed's four)")
    p.add_argument("--out", type=Path, help="where the report goes (default: multirun/reproduce/<budget>[-<model>])")
    p.add_argument("--report-only", action="store_true", help="train nothing: publish the runs finished so far")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every table (after --)")
    a = p.parse_args(argv)
    tables = [t.strip() for t in a.tables.split(",")]
    unknown = [t for t in tables if t not in CHOICES]
    if unknown:
        print(f"error: --tables {','.join(unknown)} is not allowed: use {', '.join(CHOICES)}", file=sys.stderr)
        return 2
    out = a.out or Path("multirun/reproduce") / f"{a.budget}{model_tag(model_of(a.overrides))}"
    t0, commit = time.time(), git_commit(out)
    reported = prepare(out, tables, a.budget, a.overrides)
    command = portable(shlex.join(["python", "-m", "compress.reproduce", *(argv if argv is not None else sys.argv[1:])]),
                       machine_paths())
    hw = hardware()

    def notes(wall: float, failed: list[str]) -> list[str]:
        lines = [f"- Command: `{command}` at commit `{commit}`, budget `{a.budget}`.",
                 f"- Machine: {hw['device']}, {hw['threads']} threads; torch {hw['torch']}; wall time of this reproduction "
                 f"{wall / 60:.1f} min (runs already finished before it started were skipped, see their own wall times)."]
        if failed:
            lines.append(f"- **Incomplete**: runs of {', '.join(failed)} failed; they are listed as missing below.")
        return lines

    failed: list[str] = []
    for table in [] if a.report_only else tables:
        cmd = [sys.executable, "-m", "compress.train", *table_overrides(table, a.budget, a.overrides)]
        print("+", shlex.join(cmd[1:]), flush=True)
        try:  # the report so far after every finished run, so a long reproduction is published run by run
            rc = run_publishing(cmd, sweep_dir(table, a.budget, a.overrides),
                                lambda: publish(out, reported, a.budget, a.overrides, notes(time.time() - t0, failed)))
        except Interrupted as e:
            print(f"error: {e.message()}; finished runs are published in {out}", file=sys.stderr)
            return e.exit_code
        if rc != 0:
            failed.append(table)
    report = publish(out, reported, a.budget, a.overrides, notes(time.time() - t0, failed))
    print(f"report written to {report}")
    if failed:
        print(f"error: {', '.join(failed)} failed (see above); finished runs are kept, re-run to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
