"""MkDocs hooks: results tables generated from ``bench/results/*.json`` at build time.

A page writes ``<!-- results:NAME -->`` where a table belongs; ``on_page_markdown`` replaces it
with ``cascade.bench.tables.table(NAME)``, so no measured number is copied into the docs by hand.
A name without a result file fails the build (a ValueError names it).
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TABLES = ROOT / "bench" / "tables.py"
# pyproject's package-dir: where each subpackage of the installed `cascade` lives in the repository
PACKAGE_DIRS = {"quant": "quant", "models": "models", "bench": "bench"}


def _tables_module():
    """bench/tables.py of this checkout, loaded by path (the docs build needs no install of it)."""
    spec = importlib.util.spec_from_file_location("cascade_bench_tables", _TABLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tables = _tables_module()


def source_tree(target: pathlib.Path = ROOT / "build" / "docs-src") -> pathlib.Path:
    """``target/cascade``: the package as it installs (cascade/ plus quant/, models/, bench/), as links.

    The API reference (griffe, static analysis) reads the sources from there, so the docs build
    needs neither an install nor importing JAX. Rebuilt on every build; returns ``target``.
    """
    package = target / "cascade"
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for entry in (ROOT / "cascade").iterdir():
        if entry.name not in PACKAGE_DIRS and entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve())
    for name, folder in PACKAGE_DIRS.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    return target


# Built when MkDocs loads this hook, before mkdocstrings reads its `paths` (which must exist then).
source_tree()


def api_exports() -> str:
    """One mkdocstrings block per name of ``cascade.__all__``, grouped by the module that defines it.

    Read from ``cascade._EXPORTS`` at build time, so the reference follows a name that moves
    between modules without editing this page.
    """
    import cascade

    by_module: dict[str, list[str]] = {}
    for name, module in cascade._EXPORTS.items():
        by_module.setdefault(module, []).append(cascade._ALIASES.get(name, name))
    parts = []
    for module, members in by_module.items():
        parts.append(f"## `{module}`\n")
        parts += [f"::: {module}.{member}\n" for member in members]
    return "\n".join(parts)


API_PLACEHOLDER = "<!-- api:exports -->"


def on_page_markdown(markdown: str, **_) -> str:
    """The page with its results tables filled in, and the API reference's list of names."""
    markdown = _tables.fill(markdown)
    return markdown.replace(API_PLACEHOLDER, api_exports()) if API_PLACEHOLDER in markdown else markdown
