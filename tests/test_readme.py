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
