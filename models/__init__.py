"""Llama-family models: configuration, the Flax decoder, loaders, generation, evaluation, checkpoints.

* :mod:`models.config`      :class:`ModelConfig` and Hugging Face ``config.json`` translation
* :mod:`models.llama`       the Flax decoder and its static KV cache (fp32/bf16/fp16/int8/int4)
* :mod:`models.loaders`     :func:`load_model` for HF directories, GGUF, llama2.c, saved checkpoints
* :mod:`models.tokenizer`   one tokenizer type over ``tokenizers`` and SentencePiece
* :mod:`models.generation`  jitted prefill/decode, sampling, the generation loop
* :mod:`models.evaluation`  perplexity over documents, sliding windows
* :mod:`models.quantize`    RTN quantization of a loaded model under precision rules
* :mod:`models.checkpoint`  self-contained orbax checkpoints of (quantized) models
"""

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig, UnsupportedModelError
from models.generation import Generation, SamplingConfig, generate, logits_of
from models.inspect import describe_model
from models.llama import KVCache, kv_cache_memory
from models.loaders import load_model
from models.model import Model
from models.evaluation import PerplexityResult, perplexity, split_documents, tokenize_documents
from models.quantize import quantize_model, weight_bytes

__all__ = [
    "Generation", "KVCache", "Model", "ModelConfig", "PerplexityResult", "SamplingConfig", "UnsupportedModelError",
    "describe_model", "generate", "kv_cache_memory", "load_checkpoint", "load_model", "logits_of", "perplexity", "quantize_model",
    "save_checkpoint", "split_documents", "tokenize_documents", "weight_bytes",
]
