"""One import root: everything installs under `cascade`, nothing else at the top of site-packages.

An application's own `models.py`, `quant.py`, `cli.py` or `bench.py` must never be imported by
us (nor ours by it): a script run from a directory holding such modules (each raising on import)
imports `cascade`, loads the default pair and generates, in this (editable) install and in a
regular `pip install .` into a fresh virtual environment, whose installed file list is checked too.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHADOWS = ("models", "quant", "cli", "bench")

APP = textwrap.dedent("""
    import sys
    import cascade
    from cascade import load_pair, run_pair
    from cascade import cli

    pair = load_pair()
    r = run_pair(pair, "Once upon a time", max_new_tokens=8)
    assert len(r.token_ids) == 8 and r.text.strip(), r
    assert cli.main(["--version"]) == 0
    leaked = [name for name in {shadows!r} if name in sys.modules]
    assert not leaked, f"top-level modules imported: {{leaked}}"
    print("cascade from", cascade.__file__)
""").format(shadows=SHADOWS)


def _app_dir(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    for name in SHADOWS:  # an app's own modules of the same names, which must never be imported
        (app / f"{name}.py").write_text(f"raise ImportError('the app\\'s own {name}.py was imported')\n")
    (app / "main.py").write_text(APP)
    return app


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _venv_over_this_environment(venv: Path) -> str:
    """A fresh venv whose own site-packages comes first, then this interpreter's: the
    dependencies (jax, setuptools, pip...) come from the environment running the tests, and
    `cascade` is the copy installed into the venv.  Not `--system-site-packages`: inside an
    active venv that option exposes the base interpreter's packages, not the active venv's.
    The paths are added by a .pth file, which adds them as plain directories: the .pth files
    in them (this checkout's editable install among them) are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, env=_clean_env(), check=True).stdout.strip()
    outer = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)
             and os.path.realpath(p) != os.path.realpath(own)]  # an active venv's, then the base's if it sees them
    (Path(own) / "_environment_under_test.pth").write_text("".join(f"{p}\n" for p in outer))
    return python


def _run_app(python: str, app: Path) -> str:
    proc = subprocess.run([python, "main.py"], cwd=app, capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_an_apps_own_models_quant_cli_bench_never_shadow_ours(tmp_path):
    out = _run_app(sys.executable, _app_dir(tmp_path))
    assert "cascade from" in out


def test_the_public_api_is_reexported_lazily():
    code = ("import sys, cascade; assert 'jax' not in sys.modules; "
            "names = set(cascade.__all__); "
            "assert {'load_model', 'quantize_model', 'load_pair', 'run_pair', 'plan_memory', 'generate'} <= names; "
            "import cascade.pair; assert cascade.run_pair is cascade.pair.run; "
            "assert all(getattr(cascade, n) is not None for n in names); print(len(names))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import cascade

        cascade.nope  # noqa: B018


@pytest.mark.slow
def test_a_regular_install_puts_only_cascade_in_site_packages(tmp_path):
    """`pip install .` (not editable) into a fresh venv: its file list holds `cascade/`, the
    dist-info and the console script, and the app above runs against it."""
    venv = tmp_path / "venv"
    python = _venv_over_this_environment(venv)
    src = tmp_path / "src"  # a copy, so that the build's files never touch the checkout
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "runs"))
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           str(src)], capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    show = subprocess.run([python, "-m", "pip", "show", "-f", "cascade"], capture_output=True, text=True,
                          env=_clean_env(), check=True).stdout
    assert f"Location: {venv}" in show.replace("\n", " ") or str(venv) in show
    files = [line.strip() for line in show.split("Files:", 1)[1].splitlines() if line.strip()]
    tops = {f.split("/")[0] for f in files if not f.startswith("../")}
    assert tops == {"cascade", "cascade-0.1.0.dist-info"}, sorted(tops)
    scripts = [f for f in files if f.startswith("../")]
    assert all(f.endswith("/bin/cascade") for f in scripts), scripts
    for expected in ("cascade/cli.py", "cascade/quant/qtensor.py", "cascade/models/llama.py", "cascade/bench/matmul.py",
                     "cascade/models/defaults/default-small/model.safetensors", "cascade/console.py",
                     "cascade/models/defaults/tinystories-val-sample.txt",
                     "cascade/models/defaults/smollm2-draft/cascade_checkpoint.json",
                     "cascade/models/defaults/smollm2-draft/tokenizer/tokenizer.json",
                     "cascade/models/defaults/SMOLLM2_DRAFT.md"):
        assert expected in files, expected
    shipped = {f for f in files if f.startswith("cascade/models/defaults/smollm2-draft/arrays/")}
    in_tree = {"cascade/models/defaults/" + str(p.relative_to(ROOT / "models" / "defaults"))
               for p in (ROOT / "models" / "defaults" / "smollm2-draft" / "arrays").rglob("*") if p.is_file()}
    assert shipped == in_tree  # the draft's whole checkpoint (orbax's nested files too)
    site = Path(show.split("Location:", 1)[1].split()[0])
    installed_cli = site / "cascade" / "cli.py"
    assert not installed_cli.is_symlink() and installed_cli.read_text() == (ROOT / "cli.py").read_text()
    out = _run_app(python, _app_dir(tmp_path))
    assert f"cascade from {site}" in out  # the installed copy, not the checkout
    version = subprocess.run([str(venv / "bin" / "cascade"), "--version"], capture_output=True, text=True,
                             env=_clean_env(), cwd=tmp_path)
    assert version.returncode == 0 and "0.1.0" in version.stdout
    # the evaluation's smoke test runs on the installed copy alone, from any directory, on the text it ships
    evaluate = subprocess.run([python, str(ROOT / "scripts" / "evaluate.py"), "--out", "eval", "--quick", "--sections",
                               "kv"], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = (tmp_path / "eval" / "report.json").read_text()
    assert str(site / "cascade" / "models" / "defaults" / "tinystories-val-sample.txt") in report
