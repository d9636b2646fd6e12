"""A loaded model: configuration, parameters (float or quantized) and tokenizer, as one value."""

from __future__ import annotations

import dataclasses
from typing import Any

from cascade.models.config import ModelConfig


@dataclasses.dataclass(kw_only=True)
class Model:
    config: ModelConfig  # architecture and hyper-parameters
    params: dict  # parameter tree in the layout of models.llama (leaves: arrays or QuantizedTensor)
    tokenizer: Any = None  # models.tokenizer.Tokenizer, or None when the source has none
    source: str = ""  # where it was loaded from (path or built-in name)
    format: str = ""  # "hf", "gguf", "llama2c" or "checkpoint"
    quant: str | None = None  # precision rules applied (canonical text), None for the source precision
    ptq: dict | None = None  # how it was quantized: method, settings, calibration recipe (None: not quantized here)
