"""The README and the documentation site: the site builds with `mkdocs build --strict`, the README stays a
newcomer's page (at most 16 KB), no page names a path a clone does not have, and every `mnist-deploy`
command, option and runtime name the README shows is one the CLI has."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 16 * 1024


def _doc_files() -> list[Path]:
    return [README, ROOT / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]


# ---------------------------------------------------------------------------------------------------------
# The site builds.


def _require_modules(*modules: str) -> None:
    """Skip when a module is missing, or fail where CI demands the tools (MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS,
    as conftest's require_system_tool does)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"{' and '.join(missing)} not installed (the dev extra has mkdocs and mkdocs-material)"
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.parametrize("required, outcome", [("1", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_mkdocs_skips_or_fails_where_required(monkeypatch, required, outcome):
    monkeypatch.setenv("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS", required)
    with pytest.raises(outcome, match="no_such_module_here not installed"):
        _require_modules("no_such_module_here")


def test_mkdocs_build_strict(tmp_path):
    _require_modules("mkdocs", "material")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "index.html").is_file()
    # The images the pages show are copied into the site (the README points at the same files).
    for image in ("bench.png", "screenshot.png", "training_curves.png"):
        assert (site / image).is_file(), image


def test_every_docs_page_is_in_the_nav():
    """mkdocs --strict fails on a page missing from the nav; this says which, without mkdocs installed."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    in_nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", config, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - in_nav == set(), "pages not in mkdocs.yml's nav"
    assert in_nav - pages == set(), "nav entries without a page"


# ---------------------------------------------------------------------------------------------------------
# The README is a newcomer's page.


def test_readme_is_at_most_16_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move depth into docs/ (limit {README_MAX_BYTES})"


def test_readme_links_and_images_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == []


# ---------------------------------------------------------------------------------------------------------
# No path outside the repository.

# A clone has only its own files: a path that climbs out of it, or one on the machine the docs were
# written on, is a path the reader does not have. The one home path allowed is the documented default
# cache folder.
OUTSIDE = [
    (re.compile(r"(?<![.\w])\.\./"), "a path climbing out of the repository (../)"),
    (re.compile(r"(?<![\w.~-])/(?:work|home|root|Users|tmp|srv|opt|scratch)/"), "an absolute path on one machine"),
    (re.compile(r"\bshared/data\b"), "the project's shared data folder"),
    (re.compile(r"~/(?!\.cache/mnist-deploy\b)"), "a path in someone's home folder"),
    (re.compile(r"\b[A-Z]:\\\\?[\w]"), "a Windows drive path"),
]


def _outside_paths(text: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern, what in OUTSIDE:
            m = pattern.search(line)
            if m:
                found.append(f"line {lineno}: {what}: {line.strip()[:100]}")
    return found


@pytest.mark.parametrize("text", [
    "MNIST_DEPLOY_DATA=../shared/data/mnist bash scripts/test.sh",
    "benchmark_app: /work/main/.venv/bin/benchmark_app -m model.xml",
    "mnist-deploy train --out /tmp/qa/artifacts",
    "see ~/projects/mnist",
    "the data is in shared/data/mnist",
])
def test_the_outside_path_check_catches(text):
    assert _outside_paths(text)


@pytest.mark.parametrize("text", [
    "`GET /v2/models/{name}[/versions/1]`, `.../ready`",
    "default `~/.cache/mnist-deploy`",
    "docker run -v \"$PWD/package/model_repository:/models\"",
    "point MNIST_DEPLOY_DATA at a folder holding the MNIST files",
    "KServe loads the repository from `/mnt/models`",
])
def test_the_outside_path_check_passes(text):
    assert _outside_paths(text) == []


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_path_outside_the_repository(path):
    assert _outside_paths(path.read_text(encoding="utf-8")) == []


# ---------------------------------------------------------------------------------------------------------
# Every command, option and runtime name shown is the CLI's.

_COMMAND = re.compile(r"(?:\bmnist-deploy|-m mnist_deploy)[ \t]+([a-z][\w-]*)(.*)")


def _code(text: str) -> list[str]:
    """The lines of fenced code blocks and the inline code spans, where commands are shown. An indented
    continuation line (`    [--opt ...]`) is joined to the line before it."""
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            if lines and re.match(r"\s+\[?--", line):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        else:
            lines.extend(re.findall(r"`([^`]+)`", line))
    return lines


def _shown_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, [--options]) for each `mnist-deploy COMMAND ...` in the code of ``text``; the options end at
    a comment or at the next shell command."""
    shown = []
    for line in _code(text):
        for m in _COMMAND.finditer(line):
            rest = re.split(r"\s#|&&|\|\||;|\|(?=\s)", m.group(2))[0]
            options = [o.split("=")[0] for o in re.findall(r"(?<![\w-])--[a-z][\w-]*(?:=\S*)?", rest)]
            shown.append((m.group(1), options))
    return shown


def _cli():
    from mnist_deploy.cli import cli

    return cli


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


def test_shown_commands_parse_options_up_to_a_comment():
    text = "```bash\nmnist-deploy package --out p   # then: tritonserver --model-repository p\n" \
           "mnist-deploy train [--epochs 5]\n    [--plots]\n```\nand `mnist-deploy serve --workers 2 && curl --x`"
    assert _shown_commands(text) == [("package", ["--out"]), ("train", ["--epochs", "--plots"]),
                                     ("serve", ["--workers"])]


@pytest.mark.parametrize("path", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shown_command_and_option_exists(path):
    cli = _cli()
    shown = _shown_commands(path.read_text(encoding="utf-8"))
    problems = []
    for name, options in shown:
        command = cli.commands.get(name)
        if command is None:
            problems.append(f"mnist-deploy {name}: no such command")
            continue
        known = _options(command) | {"--help"}
        problems += [f"mnist-deploy {name} {o}: no such option" for o in options if o not in known]
    assert problems == []


def test_readme_shows_every_command():
    shown = {name for name, _ in _shown_commands(README.read_text(encoding="utf-8"))}
    assert set(_cli().commands) - shown == set(), "commands with no example in the README"


def test_readme_lists_every_format_and_runtime():
    """The lists in the README are the CLI's: export's --format, predict/serve's --runtime, bench's
    --runtimes (all from the format registry)."""
    from mnist_deploy.cli import FORMAT_NAMES, PREDICT_RUNTIMES
    from mnist_deploy.formats import FORMATS

    text = README.read_text(encoding="utf-8")
    names = {*FORMAT_NAMES, *PREDICT_RUNTIMES, *(f.runtime for f in FORMATS.values())}
    assert len(PREDICT_RUNTIMES) >= 8
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert missing == []
