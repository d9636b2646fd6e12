"""cascade: quantize Llama-family models in JAX and serve them as a small-drafts / large-verifies pair.

Everything an application imports is re-exported here (README, "Python API"); the modules behind
it (``cascade.quant``, ``cascade.models``, ``cascade.pair``, ``cascade.speculative``,
``cascade.memory``, ``cascade.bench``, ``cascade.cli``) are the implementation.  The names load
lazily (PEP 562), so ``import cascade`` and ``cascade --help`` do not import JAX.

The installed package is this one import root: ``quant/``, ``models/``, ``bench/`` and ``cli.py``
of the repository install as ``cascade.quant``, ``cascade.models``, ``cascade.bench`` and
``cascade.cli`` (pyproject.toml), so nothing else lands at the top of site-packages.
"""

from __future__ import annotations

import importlib
from importlib import metadata

try:
    __version__ = metadata.version("cascade")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0+source"

# public name -> the module that defines it
_EXPORTS = {
    # loading and saving models
    "load_model": "cascade.models.loaders",
    "Model": "cascade.models.model",
    "ModelConfig": "cascade.models.config",
    "UnsupportedModelError": "cascade.models.config",
    "describe_model": "cascade.models.inspect",
    "matmul_backends": "cascade.models.inspect",
    "save_checkpoint": "cascade.models.checkpoint",
    "load_checkpoint": "cascade.models.checkpoint",
    # quantizing
    "quantize_model": "cascade.models.quantize",
    "weight_bytes": "cascade.models.quantize",
    "layer_sensitivity": "cascade.models.sensitivity",
    "plan_rules": "cascade.models.workflow",
    "auto_mixed_precision": "cascade.models.workflow",
    "report_from_json": "cascade.models.sensitivity",
    "PrecisionRules": "cascade.quant.rules",
    "QuantReport": "cascade.quant.rtn",
    "parse_spec": "cascade.quant.spec",
    "QuantizedTensor": "cascade.quant.qtensor",
    "quantize": "cascade.quant.qtensor",
    "dequantize": "cascade.quant.qtensor",
    # generating and scoring with one model
    "SamplingConfig": "cascade.models.sampling",
    "Generation": "cascade.models.generation",
    "generate": "cascade.models.generation",
    "perplexity": "cascade.models.evaluation",
    "PerplexityResult": "cascade.models.evaluation",
    "split_documents": "cascade.models.evaluation",
    "tokenize_documents": "cascade.models.evaluation",
    "parse_kv_spec": "cascade.quant.kv",
    "kv_cache_memory": "cascade.models.kv_cache",
    # the pair: speculative decoding with a quantized draft
    "ModelPair": "cascade.pair",
    "RunResult": "cascade.pair",
    "load_pair": "cascade.pair",
    "run_pair": "cascade.pair",
    "run_pair_batch": "cascade.pair",
    "RowError": "cascade.pair",
    "speculative_generate": "cascade.speculative",
    "speculative_generate_batch": "cascade.speculative",
    "SpeculativeStats": "cascade.speculative",
    # the router an app holds
    "Cascade": "cascade.router",
    # the memory plan
    "plan_memory": "cascade.memory",
    "plan_from_configs": "cascade.memory",
    "MemoryPlan": "cascade.memory",
    "parse_bytes": "cascade.memory",
    # JAX's persistent compilation cache (the CLI turns it on; an app calls it once)
    "enable_compile_cache": "cascade.compile_cache",
}
_ALIASES = {"run_pair": "run", "run_pair_batch": "generate_batch"}  # cascade.run_pair is cascade.pair.run

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cascade' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
