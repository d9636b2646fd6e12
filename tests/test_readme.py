"""The README: short, its commands parse (the test command is .ci/run's), its Python examples run,
and its one results table holds the numbers of bench/results/*.json.

Blocks that moved into docs/ are tested by tests/test_docs.py.
"""

import json
import pathlib

import click
import pytest

from tests.docs_blocks import ROOT, blocks, command_lines, parse, python_block

README = ROOT / "README.md"


def test_readme_is_short_and_links_only_to_pages_that_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    links = [link for link in __import__("re").findall(r"\]\(([^)#]+)\)", text) if "://" not in link]
    assert links and all((ROOT / link).exists() for link in links), links


def test_readme_test_command_is_the_one_ci_runs():
    """The two commands: install-and-run, and the test command .ci/run runs, verbatim."""
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip ")]
    shell = "".join(blocks(README, "bash"))
    assert len(ci) == 1 and ci[0] in shell.splitlines()
    assert 'pip install -e . && cascade run "Once upon a time" --small int4 --large int8' in shell.splitlines()


def test_readme_cascade_commands_parse():
    commands = command_lines(README)
    assert {argv[0] for argv in commands} >= {"run", "quantize", "eval", "inspect", "plan"}
    for argv in commands:
        parse(argv)
    with pytest.raises(click.UsageError):  # the checker can fail
        parse(["run", "Once upon a time", "--no-such-flag"])


def _markdown_rows(text: str, start: str, end: str) -> list[list[str]]:
    table = text[text.index(start) + len(start): text.index(end)].strip().splitlines()
    return [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in table[2:]]


def test_readme_results_table_matches_the_json():
    """Every cell of the headline table, read back as numbers, against default-pair.json itself."""
    from cascade.bench import tables

    text = README.read_text()
    rows = _markdown_rows(text, "<!-- results:headline -->", "<!-- /results -->")
    expected = json.loads((ROOT / "bench" / "results" / "default-pair.json").read_text())["perplexity"]
    assert len(rows) == len(expected) == 4
    for (model, weights, ppl, nbytes), want in zip(rows, expected):
        assert (model, weights) == (want["model"], want["weights"])
        assert float(ppl) == pytest.approx(want["ppl"], abs=5e-4)
        assert int(nbytes.replace(",", "")) == want["weight_bytes"]
    generated = tables.table("headline")  # and it is the generator's table, so it can be regenerated
    assert generated in text


def test_readme_python_example_runs(capsys):
    code = python_block(README, "quant.quantize(")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["qw"].bits_per_value < 5 and namespace["report"].bytes_after < namespace["report"].bytes_before
    assert "layers_0/attn/q/kernel" in capsys.readouterr().out


def test_readme_models_example_runs(capsys, monkeypatch, tmp_path):
    """The models block runs from the repository root, as the README says."""
    code = python_block(README, "load_model")
    code = code.replace("/tmp/stories-int8", str(tmp_path / "stories-int8"))
    from tests.shared_data import DATA

    code = code.replace("../shared/data", str(DATA))  # the README's layout, or wherever the data is mounted
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "layers_0/attn/q_proj/kernel" in out and namespace["out"].tokens[0]
    assert 1 < namespace["perplexity"](namespace["q8"].params, namespace["q8"].config,
                                       namespace["tokenize_documents"](namespace["q8"].tokenizer, namespace["docs"]),
                                       ctx=512).ppl < 10


def test_readme_cascade_example_runs(capsys):
    """The default-pair block: the speculative output equals the large model's (it asserts that itself)."""
    code = python_block(README, "load_pair")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["r"].text.strip() and namespace["same"].stats is None
    assert namespace["pair"].describe()["small"]["quant"] == "int4-full"


def test_readme_export_table_is_the_generated_one():
    """The llama.cpp check of GGUF exports: the README's table is bench/tables.py's from the results."""
    from cascade.bench import tables

    text = README.read_text()
    start, end = "<!-- results:export-readme -->\n", "\n<!-- /results -->"
    body = text[text.index(start) + len(start): text.index(end, text.index(start))]
    assert body == tables.table("export-readme")
    assert len(body.splitlines()) == 2 + 4  # the default method on each of the four models
