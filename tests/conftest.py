import atexit
import os
import shutil
import tempfile

import pytest
from hypothesis import settings

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# cascade's cache directory (JAX's compilation cache: cascade.compile_cache) is a temporary one,
# shared by the session and the CLI subprocesses it starts: no test writes to ~/.cache/cascade.
os.environ["CASCADE_HOME"] = tempfile.mkdtemp(prefix="cascade-test-home-")
atexit.register(shutil.rmtree, os.environ["CASCADE_HOME"], True)
# ... and the persistent compilation cache is off in the test session and the CLI subprocesses it
# starts (tests/test_compile_cache.py turns it on where it is tested): one pytest process calls
# `cli.main` hundreds of times, and in a full run JAX aborted the whole process inside
# `executable.serialize()` while writing an entry (not reproduced by the same test alone); a
# test run also gains nothing from it (measured: tests/test_cli_kv.py 282 s with and without).
os.environ.setdefault("CASCADE_NO_COMPILE_CACHE", "1")  # CASCADE_NO_COMPILE_CACHE=0 runs the suite with it on

# CI replays the same examples every run (no flaky red builds); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def default_pair():
    """The embedded pair loaded and quantized (small int4, large int8) once per test session, for
    the tests of the Python API (CLI tests load it the way the CLI does, per call)."""
    from cascade.pair import load_pair

    return load_pair(small_quant="int4", large_quant="int8")
