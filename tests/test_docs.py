"""The documentation site: it builds strictly, its commands parse, its Python blocks compile and
name real things (the KV-cache block runs), and its results tables come from bench/results."""

import ast
import importlib
import json
import re
import subprocess
import sys

import click
import pytest

from tests.docs_blocks import ROOT, blocks, command_lines, parse, python_block

PAGES = sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.system
def test_the_site_builds_strictly_without_a_warning(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ,
                                                                        "NO_MKDOCS_2_WARNING": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.M), log
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    import cascade

    for name, module in cascade._EXPORTS.items():  # every public name has its generated entry
        assert f'id="{module}.{cascade._ALIASES.get(name, name)}"' in api, name
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "cascade run" in cli and "--draft-len" in cli
    ptq = (tmp_path / "site" / "guides" / "ptq" / "index.html").read_text()
    assert "results:" not in ptq and "<table>" in ptq


def test_every_cascade_command_in_the_docs_parses():
    commands = [(page, argv) for page in PAGES for argv in command_lines(page)]
    assert len(commands) > 20
    for page, argv in commands:
        try:
            parse(argv)
        except click.UsageError as error:
            pytest.fail(f"{page.relative_to(ROOT)}: cascade {' '.join(argv)}: {error}")


def _imported_names(code: str) -> list[tuple[str, str | None]]:
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom):
            names += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names]
    return names


def test_every_python_block_compiles_and_imports_what_it_names():
    checked = 0
    for page in PAGES:
        for code in blocks(page, "python"):
            compile(code, str(page), "exec")
            for module, name in _imported_names(code):
                imported = importlib.import_module(module)
                assert name is None or hasattr(imported, name), f"{page.name}: from {module} import {name}"
                checked += 1
    assert checked > 10


def test_docs_kv_cache_example_runs(capsys):
    """The KV-cache block: INT8 cache memory and a generation with it."""
    code = python_block(ROOT / "docs" / "guides" / "kv-cache.md", "kv_cache_memory")
    namespace: dict = {}
    exec(compile(code, "kv-cache.md", "exec"), namespace)
    assert namespace["q8"].tokens[0] and "vs_fp16_per_token" in capsys.readouterr().out


def test_results_placeholders_name_results_and_tables_read_the_json():
    from cascade.bench import tables

    named = {m for page in PAGES for m in tables.PLACEHOLDER.findall(page.read_text())}
    assert len(named) > 30
    for name in named:
        assert tables.table(name).startswith("| ")
    # one table read back independently: every ppl cell of ptq-stories260K is its row's ppl
    rows = json.loads((ROOT / "bench" / "results" / "ptq-stories260K.json").read_text())["rows"]
    lines = tables.table("ptq-stories260K").splitlines()[2:]
    header = [c.strip() for c in tables.table("ptq-stories260K").splitlines()[0].strip("|").split("|")]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[header.index("ppl")] == f"{row['ppl']:,.3f}" and cells[0] == f"`{row['spec']}`"
    with pytest.raises(ValueError, match="no benchmark result"):
        tables.table("no-such-result")
