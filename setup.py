"""The build of cascade's native CPU kernel (pyproject.toml holds everything else).

One C++ extension, ``cascade.quant.kernels._cpu`` (quant/kernels/cpu_*.cc: the dequant-matmul
and the KV-cache attention kernels, and the Python module that hands their XLA FFI handlers to
JAX), compiled against the XLA FFI headers that jaxlib ships.  It is optional: without a C++ compiler the
install still succeeds, and the reference XLA backend serves every matmul (one warning line at
run time says so).  The code is portable C++17: the AVX2 kernels are compiled per function
(``__attribute__((target))``) and chosen at run time, so the build does not tune for the build
machine.
"""

import importlib.util
import os

from setuptools import Extension, setup


def jaxlib_include() -> str:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building cascade's CPU kernel needs jaxlib (its XLA FFI headers)")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


setup(
    ext_modules=[
        Extension(
            "cascade.quant.kernels._cpu",
            sources=["quant/kernels/cpu_module.cc", "quant/kernels/cpu_qmatmul.cc", "quant/kernels/cpu_qmatmul_a8.cc",
                     "quant/kernels/cpu_attention.cc"],
            depends=["quant/kernels/cpu_common.h"],
            include_dirs=[jaxlib_include()],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-fno-math-errno"],
            optional=True,
        )
    ],
)
