"""JAX's persistent compilation cache (``cascade.compile_cache``): a CLI call fills
``$CASCADE_HOME/jax-cache`` and gives the same output with the cache off
(``CASCADE_NO_COMPILE_CACHE=1``), which writes nothing; a program that calls the native kernel
(an XLA FFI custom call), compiled again after the in-memory caches are cleared, is read back
from the directory and gives the same result; a bad value of the variable is a usage error."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cascade import cli, compile_cache, quant


def _cli(home, *args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("CASCADE_HOME", compile_cache.DISABLE_ENV)}
    full.update(CASCADE_HOME=str(home), **env)
    proc = subprocess.run([sys.executable, "-m", "cascade.cli", *args], capture_output=True, text=True, env=full,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_a_cli_call_fills_the_cache_and_the_variable_turns_it_off(tmp_path):
    args = ["generate", "default-small", "Once upon a time", "--quant", "int4", "--kv", "int8", "--max-tokens", "3",
            "--json"]
    on = _cli(tmp_path / "on", *args)
    entries = os.listdir(tmp_path / "on" / "jax-cache")
    assert len([e for e in entries if e.endswith("-cache")]) >= 5, entries
    assert set(on["matmul_backends"]) == {"cpu"} and on["attention_backend"] == "cpu"  # custom calls were cached
    off = _cli(tmp_path / "off", *args, **{compile_cache.DISABLE_ENV: "1"})
    assert not (tmp_path / "off").exists()
    assert off["token_ids"] == on["token_ids"]


def test_a_recompiled_program_is_read_from_the_directory(tmp_path, monkeypatch):
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    before = jax.config.jax_compilation_cache_dir
    enabled = jax.config.jax_enable_compilation_cache  # off in the test processes (tests/conftest.py)
    jax.config.update("jax_enable_compilation_cache", True)
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    monkeypatch.delenv(compile_cache.DISABLE_ENV, raising=False)
    jax.monitoring.register_event_listener(listener)
    try:
        assert compile_cache.enable_compile_cache() == str(tmp_path / "jax-cache")
        rng = np.random.default_rng(0)  # a program compiled nowhere else, calling the native matmul kernel
        x = jnp.asarray(rng.normal(size=(3, 48)), jnp.float32)
        w = quant.quantize(jnp.asarray(rng.normal(size=(48, 40)), jnp.float32), "int8", axis=0)
        f = lambda x, w: jnp.tanh(quant.matmul(x, w)) * 3.25  # noqa: E731
        assert "cascade_qmatmul" in jax.jit(f).lower(x, w).as_text()
        want = np.asarray(jax.jit(f)(x, w))
        assert len(os.listdir(tmp_path / "jax-cache")) >= 1 and not hits
        jax.clear_caches()
        got = np.asarray(jax.jit(f)(x, w))
        assert hits and np.array_equal(got, want)
        monkeypatch.setenv(compile_cache.DISABLE_ENV, "1")
        assert compile_cache.enable_compile_cache() is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.monitoring.unregister_event_listener(listener)
        if before is None:
            monkeypatch.setenv(compile_cache.DISABLE_ENV, "1")
            compile_cache.enable_compile_cache()
        else:
            monkeypatch.delenv(compile_cache.DISABLE_ENV, raising=False)
            compile_cache.enable_compile_cache(before)


def test_a_bad_value_of_the_variable_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv(compile_cache.DISABLE_ENV, "maybe")
    assert cli.main(["generate", "default-small", "Once", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CASCADE_NO_COMPILE_CACHE='maybe'") and len(err.strip().splitlines()) == 1
