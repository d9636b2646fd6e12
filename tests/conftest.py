import os

from hypothesis import settings

# Tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# CI replays the same examples every run (no flaky red builds); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
