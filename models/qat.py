"""Quantization-aware fine-tuning: a short training run with the weights fake-quantized in the
forward pass, then a real quantized checkpoint.

The forward pass sees every matrix as its quantize-dequantize round trip under the precision
rules (:func:`cascade.quant.fake_quant`: the spec's range per group, straight-through gradient
inside the range, none outside), float specs as a cast; AdamW updates the float32 master weights
(the loop of :func:`cascade.models.training.train`: warm-up and cosine schedule, clipping,
resumable orbax checkpoints, ``loss.csv`` and ``loss.png`` in the run directory).  At the end the
trained master weights are RTN-quantized under the same rules, which is what the forward pass
computed (the ranges and the rounding are the same functions), and that model is returned.

Learned clipping (``learn_clip``, OmniQuant's learnable weight clipping, Shao et al. 2023, and the
clipping half of AutoRound): every integer matrix also gets per-group factors ``a``, ``b`` in
``[1/2, 1]`` (starting at 1, i.e. the spec's own range) that shrink its range to
``[a lo, b hi]``; rounding passes its gradient straight through, so the factors get gradients
from the training loss (LSQ's scale gradient) and AdamW trains them with the weights.  The
trained pytree is then ``{"weights": params, "clip": factors}``, and the checkpoint quantizes each
matrix with its learned range (:func:`cascade.quant.quantize_with_range`), again what the forward
pass computed.

Distillation (``teacher``, the recipe of LLM-QAT, Liu et al. 2023, and BitDistiller): the loss is
the KL divergence from a float teacher's next-token distribution (usually the model before
quantization) to the fake-quantized student's, on the same training windows, instead of the
cross-entropy against the text's next token.  Every position then carries the whole distribution
the quantized model should reproduce, not one sampled token.

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


CLIP_BOUNDS = (0.5, 1.0)  # the learned factors' range, as AutoRound's signed steps keep them


@dataclasses.dataclass(frozen=True)
class FakeQuantize:
    """The forward-pass transform: every parameter at its rule's precision, differentiably.
    Hashable (a static argument of the jitted step).  With ``learn_clip`` it takes
    ``{"weights": params, "clip": factors}`` (:meth:`init_clip`) and returns the model's params."""

    rules: PrecisionRules
    learn_clip: bool = False
    clip_rate: float = 1.0  # the factors' effective learning rate, as a multiple of the weights'

    def _int_leaves(self, weights):
        from cascade.models.quantize import reduction_axis

        for path, a in traverse_util.flatten_dict(weights, sep="/").items():
            spec = self.rules.spec_for(path, a.ndim)
            if isinstance(spec, IntSpec):
                yield path, a, spec, reduction_axis(path, a.shape)

    def init_clip(self, weights) -> dict:
        """Factors ``a = b = 1`` (G, R) for every integer matrix: the start is the plain transform."""
        from cascade.quant import ranges

        flat = {}
        for path, a, spec, axis in self._int_leaves(weights):
            if spec.rotate:
                raise ValueError(f"learned clipping does not apply to {spec} ({path}: its range is that of the "
                                 "rotated weight); train it without learnable clipping")
            n_groups, _, r = ranges.group_geometry(a.shape, spec, axis)
            flat[path] = {"a": jnp.ones((n_groups, r), jnp.float32), "b": jnp.ones((n_groups, r), jnp.float32)}
        return traverse_util.unflatten_dict(flat, sep="/")

    def learned_ranges(self, trained) -> dict:
        """``{path: (lo, hi)}`` in the stored scale's layout: each matrix's learned range, for
        :func:`cascade.models.quantize.quantize_model`'s ``ranges``."""
        from cascade.quant import ranges

        clip = traverse_util.flatten_dict(trained["clip"], sep="/")
        out = {}
        for path, a, spec, axis in self._int_leaves(trained["weights"]):
            lo, hi = _learned_range(ranges.to_groups(jnp.asarray(a, jnp.float32), spec, axis), spec,
                                    clip[path + "/a"], clip[path + "/b"], self.clip_rate)
            out[path] = tuple(ranges.groups_to_scale_layout(v, a.shape, spec, axis) for v in (lo, hi))
        return out

    def __call__(self, params):
        from cascade.models.quantize import reduction_axis
        from cascade.quant import fake_quant

        clip = {}
        if self.learn_clip:
            params, clip = params["weights"], traverse_util.flatten_dict(params["clip"], sep="/")
        flat = traverse_util.flatten_dict(params, sep="/")
        out = {}
        for path, a in flat.items():
            spec = self.rules.spec_for(path, a.ndim)
            if isinstance(spec, IntSpec) and path + "/a" in clip:
                a = _clipped_fake_quant(a, spec, reduction_axis(path, a.shape), clip[path + "/a"], clip[path + "/b"],
                                        self.clip_rate)
            elif isinstance(spec, IntSpec):
                a = fake_quant(a, spec, axis=reduction_axis(path, a.shape))
            elif isinstance(spec, FloatSpec):  # a cast, with the identity as its gradient
                a = a + jax.lax.stop_gradient(a.astype(spec.dtype).astype(a.dtype) - a)
            out[path] = a
        return traverse_util.unflatten_dict(out, sep="/")


def _learned_range(xg, spec: IntSpec, a, b, rate: float = 1.0):
    """The spec's range of the grouped weights (a constant: no gradient) shrunk by the factors.
    The trained parameters are ``1 + (factor - 1) / rate``: Adam moves a parameter by about the
    learning rate a step whatever its gradient's scale, so the factor moves ``rate`` times faster."""
    from cascade.quant import ranges

    lo, hi = jax.lax.stop_gradient(ranges.estimate_range(jax.lax.stop_gradient(xg), spec))
    a, b = (jnp.clip(1.0 + rate * (f - 1.0), *CLIP_BOUNDS) for f in (a, b))
    return lo * a, hi * b


def _clipped_fake_quant(w, spec: IntSpec, axis: int, a, b, rate: float = 1.0):
    """``w``'s round trip through the learned range: straight-through rounding, so ``w`` gets the
    clipped STE's gradient and ``a``, ``b`` the gradient of the scale (AutoRound's forward, with
    no rounding offsets)."""
    from cascade.quant import autoround, ranges

    xg = ranges.to_groups(w.astype(jnp.float32), spec, axis)
    lo, hi = _learned_range(xg, spec, a, b, rate)
    consts = {"w": jnp.where(jnp.isnan(xg), 0.0, xg), "lo": lo, "hi": hi}
    params = {"v": jnp.zeros_like(consts["w"]), "a": jnp.ones_like(lo), "b": jnp.ones_like(hi)}
    return ranges.from_groups(autoround.fake_quant(consts, params, spec), w.shape, spec, axis).astype(w.dtype)


def _no_decay_on_clip(params):
    """Weight decay on the matrices of the weights, never on the clipping factors (decay would pull
    them toward 0, i.e. toward an empty range)."""
    from cascade.models.training import matrices

    return {"weights": matrices(params["weights"]), "clip": jax.tree.map(lambda _: False, params["clip"])}


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
    from cascade.quant.rtn import key_path_str

    named = jax.tree_util.tree_flatten_with_path(model.params, is_leaf=is_q)[0]
    parsed.check_used(((key_path_str(p), len(a.shape)) for p, a in named), model.source or "the model")  # before training
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), float_params(model.params))
    return params, parsed, notes


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """The documents tokenized as the model reads them (BOS first where it adds one), concatenated."""
    from cascade.models.evaluation import tokenize_documents

    ids = tokenize_documents(tokenizer, documents)
    if not ids:
        raise ValueError("no documents to train on")
    return np.concatenate([np.asarray(d, np.int32) for d in ids])


def teacher_params(student: Model, teacher: Model) -> dict:
    """``teacher``'s weights as float32 params for distilling into ``student``: same architecture
    and shapes, or a one-line ValueError."""
    from cascade.models.sensitivity import float_params

    if teacher.config != student.config:
        diff = sorted(k for k, v in teacher.config.to_dict().items() if student.config.to_dict().get(k) != v)
        raise ValueError(f"the teacher {teacher.source} is not the student's architecture (differs in: {', '.join(diff)})")
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), float_params(teacher.params))


def qat(model: Model, tc, train_tokens: np.ndarray, run_dir: str, *, rules=None, val_tokens=None,
        stop_after: int | None = None, progress: bool = True, scale_dtype="float16", learn_clip: bool = False,
        clip_rate: float = 1.0, teacher: Model | None = None):
    """Fine-tune ``model`` with fake-quantized weights for ``tc.steps`` steps in ``run_dir``
    (resumed if it holds a checkpoint of the same run); returns ``(quantized Model, TrainResult,
    notes)``.  ``learn_clip``: also learn each group's clipping range (module docs), its factors
    ``clip_rate`` times faster than the weights.  ``teacher``: a float model of the same
    architecture to distil from (the loss is KL(teacher || student) on the training text instead of
    the cross-entropy; module docs).  The model's
    ``ptq`` records ``method: "qat"``, the training settings and the PTQ it started from."""
    from cascade.models.quantize import quantize_model
    from cascade.models.training import matrices, train

    params, parsed, notes = starting_point(model, rules)
    if clip_rate != 1.0 and not learn_clip:
        raise ValueError("clip_rate applies only with learn_clip")
    if not clip_rate > 0:
        raise ValueError(f"clip_rate must be positive, got {clip_rate}")
    teacher_w = None if teacher is None else teacher_params(model, teacher)
    transform = FakeQuantize(parsed, learn_clip=learn_clip, clip_rate=float(clip_rate))
    start = {"weights": params, "clip": transform.init_clip(params)} if learn_clip else params
    # a plain run records what runs before learned clipping recorded, so they still resume
    extra = {"rules": parsed.to_json(), "start": model.source, "start_ptq": model.ptq,
             **({"learn_clip": True, "clip_rate": clip_rate} if learn_clip else {}),
             **({"teacher": teacher.source} if teacher is not None else {})}
    result = train(model.config, tc, train_tokens, run_dir, val_tokens=val_tokens, stop_after=stop_after,
                   progress=progress, params=start, transform=transform, extra_config=extra,
                   decay_mask=_no_decay_on_clip if learn_clip else matrices, teacher=teacher_w)
    weights = result.params["weights"] if learn_clip else result.params
    learned = transform.learned_ranges(result.params) if learn_clip else None
    trained = dataclasses.replace(model, params=weights, quant=None, ptq=None)
    label = rules if isinstance(rules, str) else model.quant if model.ptq is not None and model.quant else parsed
    quantized, _ = quantize_model(trained, label, scale_dtype=scale_dtype, progress=False, ranges=learned)
    ptq = {"method": "qat", "source": model.source,
           "settings": {**tc.to_dict(), "steps_done": result.step, "learn_clip": learn_clip,
                        **({"clip_rate": clip_rate} if learn_clip else {}),
                        **({"teacher": teacher.source} if teacher is not None else {})},
           "calibration": None, "start": model.ptq, "seconds": round(result.elapsed_s, 3)}
    return dataclasses.replace(quantized, ptq=ptq), result, notes
