"""Llama-family models: configuration, the Flax decoder, loaders, generation, evaluation, checkpoints.

* :mod:`cascade.models.config`      :class:`ModelConfig` and Hugging Face ``config.json`` translation
* :mod:`cascade.models.llama`       the Flax decoder (the network alone)
* :mod:`cascade.models.kv_cache`    its static KV cache (fp32/bf16/fp16/int8/int4) and cached attention
* :mod:`cascade.models.attention`   attention arithmetic: masks, grouped-query attention, softmax partials
* :mod:`cascade.models.loaders`     :func:`load_model` for HF directories, GGUF, llama2.c, saved checkpoints
* :mod:`cascade.models.tokenizer`   one tokenizer type over ``tokenizers`` and SentencePiece
* :mod:`cascade.models.sampling`    the one logits -> distribution transform (temperature, top-k, top-p)
* :mod:`cascade.models.generation`  jitted prefill/decode and the generation loop
* :mod:`cascade.models.evaluation`  perplexity over documents, sliding windows
* :mod:`cascade.models.quantize`    PTQ of a loaded model under precision rules: RTN, GPTQ, AWQ, HQQ
* :mod:`cascade.models.calibration` calibration text and per-block input statistics (GPTQ, AWQ)
* :mod:`cascade.models.checkpoint`  self-contained orbax checkpoints of (quantized) models
"""

from cascade.models.checkpoint import load_checkpoint, save_checkpoint
from cascade.models.config import ModelConfig, UnsupportedModelError
from cascade.models.generation import Generation, SamplingConfig, generate
from cascade.models.decoder import logits_of
from cascade.models.inspect import describe_model, matmul_backends
from cascade.models.kv_cache import KVCache, kv_cache_memory
from cascade.models.loaders import load_model
from cascade.models.model import Model
from cascade.models.evaluation import PerplexityResult, perplexity, split_documents, tokenize_documents
from cascade.models.quantize import quantize_model, weight_bytes

__all__ = [
    "Generation", "KVCache", "Model", "ModelConfig", "PerplexityResult", "SamplingConfig", "UnsupportedModelError",
    "describe_model", "generate", "matmul_backends", "kv_cache_memory", "load_checkpoint", "load_model", "logits_of", "perplexity", "quantize_model",
    "save_checkpoint", "split_documents", "tokenize_documents", "weight_bytes",
]
