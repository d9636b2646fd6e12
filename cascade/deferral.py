"""Sequence-level deferral (a FrugalGPT-style cascade): the small model answers, and a score of
its own confidence in that answer decides whether the large model answers instead.

The score is computed from the small model's next-token distributions over its answer (one
forward pass over prompt + answer, at temperature 1, whatever the sampling settings were):

* ``mean-logprob``: mean log-probability of the answer's tokens;
* ``min-logprob``: the least likely token's log-probability;
* ``quantile``: the 10th percentile of the tokens' probabilities;
* ``entropy``: minus the mean entropy (nats) of the distributions the tokens were drawn from.

Higher is more confident for every score; the answer is deferred when ``score < threshold``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from cascade.models.config import ModelConfig
from cascade.models.decoder import logits_of

SCORES = ("mean-logprob", "min-logprob", "quantile", "entropy")
QUANTILE = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deferral:
    score: str  # which score
    value: float  # its value on the small model's answer
    threshold: float
    deferred: bool  # value < threshold: the large model answered

    @property
    def reason(self) -> str:
        cmp = "<" if self.deferred else ">="
        who = "the large model answered" if self.deferred else "the small model's answer stands"
        return f"{self.score} {self.value:.4f} {cmp} threshold {self.threshold:g}: {who}"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "reason": self.reason}


def answer_scores(params, cfg: ModelConfig, prompt: list[int], answer: list[int]) -> dict[str, float]:
    """Every :data:`SCORES` value of ``answer`` (ids) after ``prompt`` under the model ``params``."""
    if not answer:
        raise ValueError("an empty answer has no confidence score")
    logits = np.asarray(logits_of(params, cfg, [list(prompt) + list(answer)])[0], np.float64)
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(answer)]  # the distributions the answer was drawn from
    logp = np.asarray(jax.nn.log_softmax(rows, axis=-1), np.float64)
    token_lp = logp[np.arange(len(answer)), answer]
    entropy = -(np.exp(logp) * logp).sum(axis=-1)
    return {"mean-logprob": float(token_lp.mean()), "min-logprob": float(token_lp.min()),
            "quantile": float(np.quantile(np.exp(token_lp), QUANTILE)), "entropy": float(-entropy.mean())}


def check(score: str, threshold: float) -> None:
    """Raise ValueError for an unknown score or a threshold that is not a finite number."""
    if score not in SCORES:
        raise ValueError(f"unknown deferral score {score!r}; choose from {', '.join(SCORES)}")
    if not np.isfinite(threshold):
        raise ValueError(f"the deferral threshold must be a finite number, got {threshold}")


def decide(scores: dict[str, float], score: str, threshold: float) -> Deferral:
    """The verdict on an answer with ``scores`` (:func:`answer_scores`): deferred when ``score < threshold``."""
    check(score, threshold)
    value = scores[score]
    return Deferral(score=score, value=value, threshold=float(threshold), deferred=value < threshold)
