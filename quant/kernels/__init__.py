"""Fast dequant-matmul kernels, each a backend of :func:`cascade.quant.matmul`.

* :mod:`cascade.quant.kernels.cpu`  native C++ kernel (XLA FFI custom call), AVX2 + FMA with a
  scalar fallback; built by the package's own build (``pip install .``)

The plain XLA path in :mod:`cascade.quant.dequant_matmul` stays the reference every kernel is
tested against (``tests/quant/test_kernels_cpu.py``).
"""
