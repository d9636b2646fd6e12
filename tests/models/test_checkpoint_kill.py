"""kill -9 during checkpoint saves: the destination is always absent, the old checkpoint or the
complete new one, and the next save or load cleans up what the dead writer left.

A writer process saves two models (A and B) alternately onto the same directory, overwriting,
and is killed with SIGKILL at a random moment of its saves; then the test loads the directory.
``CASCADE_KILL_ROUNDS`` sets the number of kills (default 3; seeded delays).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cascade.models import llama
from cascade.models.checkpoint import load_checkpoint, recover_interrupted_save, save_checkpoint
from cascade.models.config import ModelConfig
from cascade.models.model import Model

ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16)

WRITER = r"""
import sys, jax
from cascade.models import llama
from cascade.models.checkpoint import save_checkpoint
from cascade.models.config import ModelConfig
from cascade.models.model import Model
cfg = ModelConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16)
models = [Model(config=cfg, params=llama.init_params(cfg, jax.random.key(seed)), quant=f"seed{seed}") for seed in (0, 1)]
target, i = sys.argv[1], 0
save_checkpoint(target + ".warm", models[0], overwrite=True)  # compile and import everything before the timed saves
print("ready", flush=True)
while True:
    save_checkpoint(target, models[i % 2], overwrite=True)
    print("saved", i % 2, flush=True)
    i += 1
"""


def _side_dirs(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _start_writer(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=str(ROOT))
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_kill_9_at_random_points_of_saves(tmp_path):
    """Round 0 kills the writer inside its first save (no destination yet); later rounds kill it at a
    random moment of its overwriting saves, after at least one complete save."""
    rounds = int(os.environ.get("CASCADE_KILL_ROUNDS", "3"))
    rng = random.Random(1234)
    model = Model(config=CFG, params=llama.init_params(CFG, jax.random.key(0)), quant="seed0")
    t0 = time.perf_counter()
    save_checkpoint(tmp_path / "timing", model)  # how long one save takes here, to spread the kills over saves
    per_save = time.perf_counter() - t0
    target = tmp_path / "ckpt"
    for r in range(rounds):
        proc = _start_writer(target)
        try:
            if r:
                assert proc.stdout.readline().startswith("saved")
                time.sleep(rng.uniform(0, 2 * per_save))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        left = _side_dirs(tmp_path, "ckpt")
        if r == 0 and not target.exists():
            with pytest.raises(ValueError, match="no such checkpoint"):
                load_checkpoint(target)  # recovers first, then finds nothing: never a half-written checkpoint
        else:
            loaded = load_checkpoint(target)  # recovers first: the old checkpoint or the complete new one
            assert loaded.quant in ("seed0", "seed1")
            ref = llama.init_params(CFG, jax.random.key(int(loaded.quant[-1])))
            for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(loaded.params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert _side_dirs(tmp_path, "ckpt") == [], f"left after recovery: {_side_dirs(tmp_path, 'ckpt')} (was {left})"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_writers_old_copy_is_restored_and_its_temp_removed(tmp_path):
    """Killed between the two renames of an overwrite: no destination, the old one under .old-*."""
    model = Model(config=CFG, params=llama.init_params(CFG, jax.random.key(0)), quant="seed0")
    target = tmp_path / "ck"
    save_checkpoint(target, model)
    pid = _dead_pid()
    os.rename(target, tmp_path / f".ck.old-{pid}-0123abcd")
    (tmp_path / f".ck.tmp-{pid}-89abcdef").mkdir()
    (tmp_path / f".ck.tmp-{pid}-89abcdef" / "partial").write_bytes(b"x" * 10)
    (tmp_path / f".ck.tmp-{os.getpid()}-00000000").mkdir()  # a live writer's (ours): left alone
    (tmp_path / f".other.tmp-{pid}-00000000").mkdir()  # another destination's: left alone
    with pytest.warns(UserWarning, match="restored the previous checkpoint"):
        restored = load_checkpoint(target)
    assert restored.quant == "seed0"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ck", f".ck.tmp-{os.getpid()}-00000000", f".other.tmp-{pid}-00000000"])


def test_next_save_cleans_up_and_a_stale_old_copy_goes_when_the_target_is_complete(tmp_path):
    model = Model(config=CFG, params=llama.init_params(CFG, jax.random.key(0)), quant="seed0")
    target = tmp_path / "ck"
    save_checkpoint(target, model)
    pid = _dead_pid()
    save_checkpoint(tmp_path / "spare", model)
    os.rename(tmp_path / "spare", tmp_path / f".ck.old-{pid}-0123abcd")  # killed after installing the new one
    (tmp_path / f".ck.tmp-{pid}-89abcdef").mkdir()
    done = recover_interrupted_save(target)
    assert len(done) == 2 and all("removed" in d for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(ValueError, match="already exists"):
        save_checkpoint(target, model)  # the restored/complete target still needs overwrite=True


def test_cli_reports_the_restored_checkpoint_on_load(tmp_path, capsys):
    from cascade import cli

    model = Model(config=CFG, params=llama.init_params(CFG, jax.random.key(0)), quant="seed0")
    target = tmp_path / "ck"
    save_checkpoint(target, model)
    os.rename(target, tmp_path / f".ck.old-{_dead_pid()}-0123abcd")
    code = cli.main(["inspect", str(target), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and '"format": "checkpoint"' in out
    assert err.startswith("warning: ") and "restored the previous checkpoint" in err and err.count("\n") == 1
