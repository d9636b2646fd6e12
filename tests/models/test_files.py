"""`cascade.models.files`: a reader sees the whole old file or directory or the whole new one, and a
failed write leaves nothing behind."""

import json
import os

import pytest

from cascade.models import files


def test_a_file_is_replaced_whole_and_no_temporary_stays(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    files.write_json(path, {"ppl": 3.5, "rows": [1, 2]})
    assert json.loads(path.read_text()) == {"ppl": 3.5, "rows": [1, 2]} and path.read_text().endswith("}\n")
    assert os.listdir(tmp_path) == ["result.json"]


def test_a_writer_that_raises_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss\n1,2.5\n")
    with pytest.raises(RuntimeError, match="killed"):
        with files.atomic_open(path) as f:
            f.write("step,loss\n")  # half of the new contents
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "step,loss\n1,2.5\n" and os.listdir(tmp_path) == ["loss.csv"]


def test_a_value_that_is_not_json_writes_nothing(tmp_path):
    path = tmp_path / "result.json"
    with pytest.raises(ValueError):
        files.write_json(path, {"ppl": float("nan")}, allow_nan=False)
    assert os.listdir(tmp_path) == []


def test_a_write_that_fails_names_the_path_in_one_line(tmp_path):
    path = tmp_path / "missing" / "result.json"
    with pytest.raises(OSError, match=r"^cannot write .*missing/result\.json: No such file or directory$"):
        files.write_text(path, "x")


def test_the_temporary_is_a_hidden_sibling_named_for_recovery(tmp_path):
    side = files.side_path(tmp_path / "ck", "tmp")
    assert os.path.dirname(side) == str(tmp_path)
    m = files.SIDE_PATH.match(os.path.basename(side))
    assert m and m["name"] == "ck" and m["kind"] == "tmp" and int(m["pid"]) == os.getpid()


def test_a_directory_replaces_the_old_one_and_a_failed_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("old")
    new = tmp_path / ".model.tmp-1-00000000"
    new.mkdir()
    (new / "a").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        files.replace_directory(str(new), str(target))
    assert (target / "a").read_text() == "old" and sorted(os.listdir(tmp_path)) == [".model.tmp-1-00000000", "model"]
    monkeypatch.undo()
    files.replace_directory(str(new), str(target))
    assert (target / "a").read_text() == "new" and os.listdir(tmp_path) == ["model"]
