import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from tests.shared_data import DATA

ROOT = Path(__file__).resolve().parents[1]

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# ... and compile without LLVM's optimizations: the suite is compile-bound (thousands of small
# programs), and the float results are the same (no fast-math either way: LLVM may not reorder
# float arithmetic).  Measured on 2 cores with two workers: tests/test_cli_run.py +
# tests/cascade/test_pair.py 101 s -> 79 s; tests/models/test_ptq.py + tests/quant/test_gptq.py +
# tests/quant/test_kernels_cpu.py (compute-bound) 143 s either way.  The CLI subprocesses inherit it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# cascade's cache directory (JAX's persistent compilation cache: cascade.compile_cache) is one
# temporary directory for the whole run: the pytest process, its xdist workers (which inherit
# CASCADE_TEST_HOME from the process that made it) and every CLI subprocess a test starts, so a
# subprocess loads what an earlier one compiled.  No test writes to ~/.cache/cascade.
if "CASCADE_TEST_HOME" not in os.environ:
    os.environ["CASCADE_TEST_HOME"] = tempfile.mkdtemp(prefix="cascade-test-home-")
    atexit.register(shutil.rmtree, os.environ["CASCADE_TEST_HOME"], True)
os.environ["CASCADE_HOME"] = os.environ["CASCADE_TEST_HOME"]
os.environ.pop("CASCADE_NO_COMPILE_CACHE", None)
# Inside the pytest processes themselves JAX's persistent cache stays unused (tests that test it
# turn it on): every program is compiled once per process anyway (measured: tests/test_cli_kv.py
# 282 s with the cache and without), and the cache would hash and serialize each of thousands of
# programs for nothing.
import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

# CI replays the same examples every run (no flaky red builds); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# --- tiers ---------------------------------------------------------------------------------------
# Every test gets one tier mark, by its file (a test may carry `@pytest.mark.system` itself):
#   unit   - small tensors, random weights, hand cases: the development loop (`-m unit`, minutes)
#   model  - the real models of ../shared/data and the embedded default pair, and the CLI in-process
#   system - other processes: CLI subprocesses, 8 host devices, multi-process, packaging, docs build
UNIT = ("tests/quant/", "tests/models/test_llama.py", "tests/models/test_calibration.py",
        "tests/models/test_checkpoint.py", "tests/models/test_export.py", "tests/models/test_files.py",
        "tests/models/test_generation.py", "tests/models/test_training.py", "tests/models/test_weights_file.py",
        "tests/models/loaders/test_common.py", "tests/models/loaders/test_hf.py", "tests/cascade/test_console.py",
        "tests/bench/test_plots.py")
SYSTEM = ("tests/test_packaging.py", "tests/test_compile_cache.py", "tests/test_docs.py",
          "tests/models/test_checkpoint_kill.py", "tests/models/test_multihost.py", "tests/models/test_sharding.py")
TIERS = ("unit", "model", "system")


def _tier(item) -> str:
    if item.get_closest_marker("system"):
        return "system"
    path = Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()
    if path.startswith(SYSTEM):
        return "system"
    return "unit" if path.startswith(UNIT) else "model"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier(item)
        if not item.get_closest_marker(tier):
            item.add_marker(tier)


# --- compiled programs ---------------------------------------------------------------------------
# XLA:CPU maps each compiled program's code into memory; one pytest process compiles thousands of
# programs (1,357 tests), and past ~65,000 mappings (Linux's vm.max_map_count) the next
# compilation or serialization dies in native code (seen in CI: a segfault in
# backend_compile_and_load, an abort in executable.serialize, both in tests/test_cli_models.py
# after ~1,300 tests; tests/cascade alone ends at 39,500 mappings).  Above MAX_MAPPINGS the
# compiled programs are dropped (they compile again when next used); below it nothing happens.
MAX_MAPPINGS = 30_000


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
    yield
    if _mappings() > MAX_MAPPINGS:
        import jax

        jax.clear_caches()
        gc.collect()


# --- shared models (loaded once per session, read-only: params are immutable JAX arrays) ---------
@pytest.fixture(scope="session")
def stories260k():
    """stories260K (llama2c .bin, with its SentencePiece tokenizer) as a float Model."""
    from cascade.models.loaders import load_model

    return load_model(str(DATA / "stories260K" / "stories260K.bin"))


@pytest.fixture(scope="session")
def default_pair():
    """The embedded pair loaded and quantized (small int4, large int8) once per test session, for
    the tests of the Python API (CLI tests load it the way the CLI does, per call)."""
    from cascade.pair import load_pair

    return load_pair(small_quant="int4", large_quant="int8")

