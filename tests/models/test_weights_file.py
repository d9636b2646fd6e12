import numpy as np
import pytest
from safetensors.numpy import save_file

from cascade.models import weights_file


def test_loads_safetensors_and_npz_identically(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **tensors)
    for name in ("w.safetensors", "w.npz"):
        loaded = weights_file.load(str(tmp_path / name))
        assert set(loaded) == {"a", "b"}
        for k in tensors:
            np.testing.assert_array_equal(loaded[k], tensors[k])
            assert loaded[k].dtype == tensors[k].dtype


def test_default_reduction_axis():
    assert weights_file.default_reduction_axis("m/model.SAFETENSORS") == 1
    assert weights_file.default_reduction_axis("w.npz") == 0


@pytest.mark.parametrize("name,content,match", [
    ("x.bin", b"abc", "unsupported weights file type"),
    ("x.npz", b"PK\x03\x04garbage", "cannot read"),
    ("x.safetensors", b"\xff" * 16, "cannot read"),
])
def test_bad_files_name_the_path(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        weights_file.load(str(path))
    assert str(path) in str(info.value)


def test_empty_and_object_arrays(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="no tensors"):
        weights_file.load(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npz: cannot read"):
        weights_file.load(str(tmp_path / "obj.npz"))
