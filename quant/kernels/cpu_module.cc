// The Python module cascade.quant.kernels._cpu: PyCapsules of the native CPU kernels' XLA FFI
// handlers (cpu_qmatmul.cc, cpu_attention.cc), for jax.ffi.register_ffi_target.

#include <Python.h>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(CascadeQMatmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CascadeQMatmulMany);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CascadeQMatmulA8);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CascadeQMatmulA8Many);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CascadeCacheAttentionFloat);
XLA_FFI_DECLARE_HANDLER_SYMBOL(CascadeCacheAttentionKivi);

static PyObject* capsule(void* fn) { return PyCapsule_New(fn, nullptr, nullptr); }

static PyObject* qmatmul_handler(PyObject*, PyObject*) { return capsule(reinterpret_cast<void*>(&CascadeQMatmul)); }

static PyObject* qmatmul_many_handler(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CascadeQMatmulMany));
}

static PyObject* qmatmul_a8_handler(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CascadeQMatmulA8));
}

static PyObject* qmatmul_a8_many_handler(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CascadeQMatmulA8Many));
}

static PyObject* attention_float_handler(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CascadeCacheAttentionFloat));
}

static PyObject* attention_kivi_handler(PyObject*, PyObject*) {
  return capsule(reinterpret_cast<void*>(&CascadeCacheAttentionKivi));
}

static PyObject* simd(PyObject*, PyObject*) {
  return PyUnicode_FromString(cascade_cpu::use_simd() ? "avx2+fma" : "scalar");
}

static PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(cascade_cpu::isa_name(cascade_cpu::isa())); }

static PyObject* hardware_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(cascade_cpu::isa_name(cascade_cpu::hardware_isa()));
}

static PyMethodDef kMethods[] = {
    {"qmatmul_handler", qmatmul_handler, METH_NOARGS, "PyCapsule of the cascade_qmatmul XLA FFI handler."},
    {"attention_float_handler", attention_float_handler, METH_NOARGS,
     "PyCapsule of the cascade_cache_attention_float XLA FFI handler."},
    {"attention_kivi_handler", attention_kivi_handler, METH_NOARGS,
     "PyCapsule of the cascade_cache_attention_kivi XLA FFI handler."},
    {"qmatmul_many_handler", qmatmul_many_handler, METH_NOARGS,
     "PyCapsule of the cascade_qmatmul_many XLA FFI handler."},
    {"qmatmul_a8_handler", qmatmul_a8_handler, METH_NOARGS, "PyCapsule of the cascade_qmatmul_a8 XLA FFI handler."},
    {"qmatmul_a8_many_handler", qmatmul_a8_many_handler, METH_NOARGS,
     "PyCapsule of the cascade_qmatmul_a8_many XLA FFI handler."},
    {"isa", isa, METH_NOARGS, "The instruction set the kernels run with now (CASCADE_CPU_ISA caps it): scalar, avx2 or avx512vnni."},
    {"hardware_isa", hardware_isa, METH_NOARGS, "The best instruction set this processor has a path for."},
    {"simd", simd, METH_NOARGS, "The instruction set the kernels run with here: 'avx2+fma' or 'scalar'."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu", "cascade's native CPU kernels (XLA FFI handlers).", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
