"""Quantization core: precision specs, packed formats, quantize/dequantize, observers, PTQ.

The public API lives here; each idea has one module behind it:

* :mod:`cascade.quant.spec`        the precision-spec grammar (``int4-g128-asym`` ...)
* :mod:`cascade.quant.packing`     bit layout of packed int8/4/3/2 codes
* :mod:`cascade.quant.qtensor`     :class:`QuantizedTensor`, quantize / dequantize
* :mod:`cascade.quant.ranges`      grouping and range estimation (min-max, percentile, MSE search)
* :mod:`cascade.quant.observers`   activation statistics over calibration batches
* :mod:`cascade.quant.ste`         fake quantization with a straight-through estimator (QAT)
* :mod:`cascade.quant.rules`       precision rules (regex over parameter paths -> spec)
* :mod:`cascade.quant.rtn`         round-to-nearest PTQ of a parameter pytree, with a report
* :mod:`cascade.quant.gptq`        GPTQ on one weight matrix given its Hessian (the core)
* :mod:`cascade.quant.awq`         AWQ scale and clip searches on matrices, and the exact folds into a block
* :mod:`cascade.quant.hqq`         HQQ: half-quadratic zero-point / scale optimisation (calibration-free)
* :mod:`cascade.quant.autoround`   AutoRound: rounding and clipping learned by signed gradient descent
* :mod:`cascade.quant.dequant_matmul` dequant-matmul and its backend registry
* :mod:`cascade.quant.activations` int8 activations: the W8A8 matmul (``w8a8`` specs), the per-block ``-a8`` reference
* :mod:`cascade.quant.smoothquant` SmoothQuant's smoothing scales, folds and alpha search
* :mod:`cascade.quant.hadamard`    the randomized Hadamard rotation of the ``-had`` W8A8 specs
"""

from cascade.quant.ste import fake_quant
from cascade.quant.dequant_matmul import backends, matmul, matmul_many, matmul_t, register_backend
from cascade.quant.gptq import gptq_quantize
from cascade.quant.observers import HistogramObserver, MinMaxObserver
from cascade.quant.qtensor import QuantizedTensor, codes, dequantize, quantize, quantize_with_range, storage_nbytes, transpose
from cascade.quant.rtn import QuantReport, quantize_params
from cascade.quant.rules import KEEP_16BIT_RULES, PrecisionRules
from cascade.quant.spec import FloatSpec, IntSpec, Spec, parse_spec

__all__ = [
    "FloatSpec", "HistogramObserver", "IntSpec", "KEEP_16BIT_RULES", "MinMaxObserver", "PrecisionRules",
    "QuantReport", "QuantizedTensor", "Spec", "backends", "codes", "dequantize", "fake_quant", "gptq_quantize", "matmul", "matmul_many", "matmul_t",
    "parse_spec", "quantize", "quantize_params", "quantize_with_range", "register_backend", "storage_nbytes", "transpose",
]
