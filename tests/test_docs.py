"""The README and the documentation site (docs/, mkdocs.yml): the README stays short and its links
resolve, the pages speak of the project only, every ``python -m compress.train`` command they show
composes (and validates) as written, and ``mkdocs build --strict`` passes."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TEXTS = [README, *PAGES]
FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Words and paths that do not belong in the project's own documentation: tracker references
# ("issue 27", "#28", "the goals") and files outside the repository.
FORBIDDEN = {
    "an issue reference": re.compile(r"\bissues?\b", re.I),
    "a '#<number>' reference": re.compile(r"(?<![\w&/#])#\d+\b"),
    "the seed report's path": re.compile(r"seed-report\.md|shared/reference", re.I),
    "a path outside the repository": re.compile(r"\.\./shared\b"),
}
# Hydra plugins a command may need; where one is not installed its commands are skipped.
PLUGINS = {
    "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=submitit": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hparams_search=": "hydra_plugins.hydra_optuna_sweeper",
}


GROUPS = {p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "hydra"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_blocks(path: Path) -> list[str]:
    """The bodies of the fenced code blocks of a markdown file."""
    return [m.group(2) for m in FENCE.finditer(path.read_text())]


def train_commands() -> list[tuple[str, str]]:
    """``(file, command line)`` for every ``python -m compress.train`` command in a fenced code
    block of the README and the docs (continuation lines joined, a ``$`` prompt dropped)."""
    found = []
    for path in TEXTS:
        for block in code_blocks(path):
            for line in re.sub(r"\\\n", " ", block).splitlines():
                line = line.strip().removeprefix("$ ")
                words = shlex.split(line, comments=True) if "compress.train" in line else []
                starts = [i for i in range(len(words) - 2) if words[i:i + 3] == ["python", "-m", "compress.train"]]
                if starts:
                    found.append((rel(path), line))
    return found


def overrides_of(line: str) -> list[str]:
    """The Hydra overrides of a command as one single run: ``-m`` and flags dropped, every
    comma-sweep narrowed to its first value."""
    words = shlex.split(line, comments=True)
    start = next(i for i in range(len(words)) if words[i:i + 3] == ["python", "-m", "compress.train"])
    args = [w for w in words[start + 3:] if not w.startswith("-")]  # -m, --help, --cfg ...
    parsed = OverridesParser.create().parse_overrides(args)
    out = []
    for o in parsed:
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


COMMANDS = train_commands()


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_relative_links_resolve() -> None:
    links = [t for t in LINK.findall(README.read_text()) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    assert links, "the README links into docs/"
    for target in links:
        path = (REPO / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"README.md links outside the repository: {target}"
        assert path.exists(), f"README.md links to {target}, which does not exist"


def test_readme_covers_the_essentials() -> None:
    text = README.read_text()
    for needed in ("--index-url https://download.pytorch.org/whl/cpu", 'pip install -e ".[dev,report]"',
                   "python -m compress.train -m nbits=2,3,4 quant=sym", "experiment=table3_",
                   "python -m compress.export RUN_DIR --onnx", "python -m pytest -q", "-m slow",
                   "(0.485, 0.456, 0.406)", "(0.229, 0.224, 0.225)", "multirun/", "outputs/"):
        assert needed in text, f"README.md no longer says {needed!r}"


@pytest.mark.parametrize("path", TEXTS, ids=rel)
def test_speaks_of_the_project_only(path: Path) -> None:
    text = path.read_text()
    for what, pattern in FORBIDDEN.items():
        hit = pattern.search(text)
        assert hit is None, f"{rel(path)} has {what}: {text[max(0, hit.start() - 40):hit.end() + 40]!r}"


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = {page for entry in config["nav"] for page in entry.values()}
    assert nav == {p.name for p in PAGES}
    assert config["theme"]["name"] == "material" and config.get("strict") is True


def test_library_example_is_the_readmes() -> None:
    """docs/library.md shows the README's example (the one tests/test_library.py runs) unchanged."""
    readme = re.search(r"<!-- library-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert readme, "README.md has no library example"
    assert readme.group(1) in code_blocks(DOCS / "library.md")


def test_figures_are_the_published_ones() -> None:
    copies = {"sensitivity_quant.png": "multirun/published/sensitivity/quant/sensitivity_quant.png",
              "sensitivity_prune.png": "multirun/published/sensitivity/prune/sensitivity_prune.png",
              "frontier_front.png": "multirun/published/frontier/front.png"}
    assert {p.name for p in (DOCS / "img").iterdir()} == set(copies)
    for name, original in copies.items():
        assert (DOCS / "img" / name).read_bytes() == (REPO / original).read_bytes(), f"docs/img/{name} != {original}"


def test_export_page_keeps_its_formats_section() -> None:
    assert re.search(r"^## Formats$", (DOCS / "export.md").read_text(), re.M)


def test_commands_are_found() -> None:
    files = {f for f, _ in COMMANDS}
    assert len(COMMANDS) >= 25 and {"README.md", "docs/getting-started.md", "docs/own-model.md"} <= files


@pytest.fixture(scope="module")
def composer():
    """``compose(overrides)``: the app's config with its Hydra config, from ``conf/``."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[f"{f}:{line[:70]}" for f, line in COMMANDS])
def test_documented_command_composes(composer, monkeypatch: pytest.MonkeyPatch, where: str, line: str) -> None:
    """Each documented command composes and validates as a single run (``-m`` dropped, a sweep
    narrowed to its first point), as ``python -m compress.train ... --cfg job`` would."""
    from compress.config import validate

    for needle, module in PLUGINS.items():
        if needle in line and not installed(module):
            pytest.skip(f"{module} is not installed")
    monkeypatch.delenv("COMPRESS_RUNS", raising=False)
    overrides = overrides_of(line)
    cfg = composer(overrides)
    validate(cfg)
    choices = cfg.hydra.runtime.choices
    for override in overrides:  # what the command sets is what the config holds
        key, _, value = override.partition("=")
        if key in GROUPS:
            assert choices[key] == value, f"{where}: {override} chose {key}={choices[key]}"
        elif "." in key and not key.startswith(("+", "~", "hydra.")):
            node = cfg
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            assert last in node, f"{where}: {override} is not in the composed config"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for page in PAGES:
        built = tmp_path / "site" / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{rel(page)} was not built"
