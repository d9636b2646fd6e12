import os

# Tests run on the CPU with float32 defaults; keep XLA to one thread pool per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
