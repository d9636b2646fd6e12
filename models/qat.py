"""Quantization-aware fine-tuning: a short training run with the weights fake-quantized in the
forward pass, then a real quantized checkpoint.

The forward pass sees every matrix as its quantize-dequantize round trip under the precision
rules (:func:`cascade.quant.fake_quant`: the spec's range per group, straight-through gradient
inside the range, none outside), float specs as a cast; AdamW updates the float32 master weights
(the loop of :func:`cascade.models.training.train`: warm-up and cosine schedule, clipping,
resumable orbax checkpoints, ``loss.csv`` and ``loss.png`` in the run directory).  At the end the
trained master weights are RTN-quantized under the same rules, which is what the forward pass
computed (the ranges and the rounding are the same functions), and that model is returned.

Starting points: a float model with rules, or a quantized checkpoint from any PTQ method, whose
dequantized weights are the start and whose rules are kept.  A model whose weights were stored
quantized by its file format (a GGUF import) has no float copy to train: it is dequantized first,
and :func:`qat` says so through ``notes``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cascade.models.model import Model
from cascade.quant.rules import PrecisionRules
from cascade.quant.spec import FloatSpec, IntSpec


@dataclasses.dataclass(frozen=True)
class FakeQuantize:
    """The forward-pass transform: every parameter at its rule's precision, differentiably.
    Hashable (a static argument of the jitted step)."""

    rules: PrecisionRules

    def __call__(self, params):
        from cascade.models.quantize import reduction_axis
        from cascade.quant import fake_quant

        flat = traverse_util.flatten_dict(params, sep="/")
        out = {}
        for path, a in flat.items():
            spec = self.rules.spec_for(path, a.ndim)
            if isinstance(spec, IntSpec):
                a = fake_quant(a, spec, axis=reduction_axis(path, a.shape))
            elif isinstance(spec, FloatSpec):  # a cast, with the identity as its gradient
                a = a + jax.lax.stop_gradient(a.astype(spec.dtype).astype(a.dtype) - a)
            out[path] = a
        return traverse_util.unflatten_dict(out, sep="/")


def starting_point(model: Model, rules=None) -> tuple[dict, PrecisionRules, list[str]]:
    """``(float32 params, rules, notes)`` to start QAT from (module docs)."""
    from cascade.models.sensitivity import float_params
    from cascade.quant import QuantizedTensor

    notes = []
    is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731
    stored_quantized = any(is_q(a) for a in jax.tree.leaves(model.params, is_leaf=is_q))
    if model.ptq is not None and model.quant:  # a checkpoint of ours: keep its precisions
        if rules is not None and PrecisionRules.parse(rules) != PrecisionRules.parse(model.quant):
            raise ValueError(f"{model.source} is already quantized ({model.quant}); QAT keeps its precisions: "
                             "drop --quant, or start from the float model")
        rules = model.quant
        notes.append(f"starting from the dequantized weights of {model.ptq.get('method')} ({model.quant})")
    elif stored_quantized:
        notes.append(f"{model.source} stores quantized weights ({model.format}); dequantized to float32 to train")
    if rules is None:
        raise ValueError("QAT needs precision rules: pass --quant SPEC_OR_RULES (or start from a quantized checkpoint)")
    parsed = PrecisionRules.parse(rules)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), float_params(model.params))
    return params, parsed, notes


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """The documents tokenized as the model reads them (BOS first where it adds one), concatenated."""
    from cascade.models.evaluation import tokenize_documents

    ids = tokenize_documents(tokenizer, documents)
    if not ids:
        raise ValueError("no documents to train on")
    return np.concatenate([np.asarray(d, np.int32) for d in ids])


def qat(model: Model, tc, train_tokens: np.ndarray, run_dir: str, *, rules=None, val_tokens=None,
        stop_after: int | None = None, progress: bool = True, scale_dtype="float16"):
    """Fine-tune ``model`` with fake-quantized weights for ``tc.steps`` steps in ``run_dir``
    (resumed if it holds a checkpoint of the same run); returns ``(quantized Model, TrainResult,
    notes)``.  The model's ``ptq`` records ``method: "qat"``, the training settings and the PTQ
    it started from."""
    from cascade.models.quantize import quantize_model
    from cascade.models.training import train

    params, parsed, notes = starting_point(model, rules)
    transform = FakeQuantize(parsed)
    extra = {"rules": parsed.to_json(), "start": model.source, "start_ptq": model.ptq}
    result = train(model.config, tc, train_tokens, run_dir, val_tokens=val_tokens, stop_after=stop_after,
                   progress=progress, params=params, transform=transform, extra_config=extra)
    trained = dataclasses.replace(model, params=result.params, quant=None, ptq=None)
    label = rules if isinstance(rules, str) else model.quant if model.ptq is not None and model.quant else parsed
    quantized, _ = quantize_model(trained, label, scale_dtype=scale_dtype, progress=False)
    ptq = {"method": "qat", "source": model.source, "settings": {**tc.to_dict(), "steps_done": result.step},
           "calibration": None, "start": model.ptq, "seconds": round(result.elapsed_s, 3)}
    return dataclasses.replace(quantized, ptq=ptq), result, notes
