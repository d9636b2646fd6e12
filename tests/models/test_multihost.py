"""Two CPU processes joined by jax.distributed (Gloo collectives): a model placed over both
processes' devices gives each process the logits and tokens it computes alone; incomplete or
inconsistent process settings are one clear error before JAX is touched."""

import json
import os
import socket
import subprocess
import sys

import pytest

from cascade.models import sharding

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts",
                      "multihost_check.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device():
    proc = subprocess.run([sys.executable, SCRIPT, "--processes", "2", "--devices-per-process", "2", "--port",
                           str(_free_port()), "--timeout", "900"], capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    d = json.loads(proc.stdout)
    assert d["ok"] is True and len(d["results"]) == 2
    assert sorted(r["process_index"] for r in d["results"]) == [0, 1]
    for r in d["results"]:
        assert r["process_count"] == 2 and r["devices"] == 4 and r["local_devices"] == 2
        assert [x["weights"] for x in r["runs"]] == ["float", "int4-g16", "float, loaded sharded"]
        for x in r["runs"]:
            assert x["tp"] == 4 and x["max_logit_diff"] <= 1e-5 and x["tokens_equal"] is True
        # loading at scale: each process read its half of the split tensors (and the small norms whole)
        loaded = r["runs"][-1]
        assert 0.45 * loaded["model_bytes"] <= loaded["read_bytes"] <= 0.55 * loaded["model_bytes"], loaded


@pytest.mark.parametrize("kw, message", [
    ({"coordinator": "localhost:1"}, "needs all of JAX_COORDINATOR_ADDRESS"),
    ({"coordinator": "localhost:1", "num_processes": 2, "process_id": 2}, "process id 2 is outside 0..1"),
])
def test_bad_process_settings_are_one_clear_error(monkeypatch, kw, message):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message):
        sharding.initialize_distributed(**kw)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="must be integers"):
        sharding.initialize_distributed()
