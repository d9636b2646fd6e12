"""The README's Python example runs as written."""

import pathlib


def test_readme_python_example_runs(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    code = text[start:text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["qw"].bits_per_value < 5 and namespace["report"].bytes_after < namespace["report"].bytes_before
    assert "layers_0/attn/q/kernel" in capsys.readouterr().out


def test_readme_models_example_runs(capsys, monkeypatch, tmp_path):
    """The second Python block (models) runs from the repository root, as the README says."""
    root = pathlib.Path(__file__).parent.parent
    text = (root / "README.md").read_text()
    blocks = text.split("```python\n")[1:]
    code = next(c for c in (b[: b.index("```")] for b in blocks) if "load_model" in c)
    code = code.replace("/tmp/stories-int8", str(tmp_path / "stories-int8"))
    from tests.shared_data import DATA

    code = code.replace("../shared/data", str(DATA))  # the README's layout, or wherever the data is mounted
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "layers_0/attn/q_proj/kernel" in out and namespace["out"].tokens[0]
    assert 1 < namespace["perplexity"](namespace["q8"].params, namespace["q8"].config,
                                       namespace["tokenize_documents"](namespace["q8"].tokenizer, namespace["docs"]),
                                       ctx=512).ppl < 10


def test_readme_cascade_example_runs(capsys):
    """The default-pair block: the speculative output equals the large model's (it asserts that itself)."""
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = text.split("```python\n")[1:]
    code = next(c for c in (b[: b.index("```")] for b in blocks) if "load_pair" in c)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["r"].text.strip() and namespace["same"].stats is None
    assert namespace["pair"].describe()["small"]["quant"] == "int4"


def test_readme_kv_cache_example_runs(capsys):
    """The KV-cache block: INT8 cache memory and a generation with it."""
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = text.split("```python\n")[1:]
    code = next(c for c in (b[: b.index("```")] for b in blocks) if "kv_cache_memory" in c)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["q8"].tokens[0] and "vs_fp16_per_token" in capsys.readouterr().out
