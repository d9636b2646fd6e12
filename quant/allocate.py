"""Bit allocation under a byte budget: pick one candidate precision per layer so that the summed
predicted loss is lowest and the summed bytes fit (a multiple-choice knapsack), in plain numpy.

Input: for each layer, its candidates ``(spec, bytes, loss)``, ``loss`` the predicted increase of
the model's loss (e.g. the KL divergence measured with only that layer quantized, from
:mod:`cascade.models.sensitivity`).  The model assumes the increases add up across layers; the
sensitivity report measures how well that holds.

Solver: dynamic programming over the budget in byte units, exact whenever every candidate's bytes
and the budget are multiples of the unit.  The unit is the greatest common divisor of all the
byte counts when that keeps the table within ``resolution`` cells; otherwise ``budget /
resolution``, with every candidate's bytes rounded **up** to whole units, so the chosen total
never exceeds the budget (at worst it leaves ``len(layers)`` units unused).  The table is
``len(layers) x resolution`` bytes of back-pointers: 7 MB for SmolLM2's 210 linear layers at the
default resolution.

``loss`` may be any float; a layer whose candidates all cost more bytes than the budget allows
makes the problem infeasible, which is one :class:`InfeasibleBudget` error giving the smallest
budget that fits.

From a sensitivity report to rules (:func:`auto_rules`): each unit's measured rows become its
candidates, the knapsack picks one per unit, and the picks are written as one anchored rule per
parameter path of the unit (``^layers_3/mlp/down_proj/kernel$ -> int4-g128``).  The report is any
object with ``rows`` (``unit``, ``spec``, ``nbytes``, ``kl``), ``units`` (unit -> paths) and
``params`` (unit -> number of weights): :class:`cascade.models.sensitivity.SensitivityReport`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from cascade.quant.rules import PrecisionRules

DEFAULT_RESOLUTION = 1 << 15


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
    """One candidate precision of one layer."""

    spec: str  # the precision spec (e.g. "int4-g128", "bf16")
    nbytes: int  # bytes the layer takes stored at that precision
    loss: float  # predicted increase of the loss with the layer at that precision


class InfeasibleBudget(ValueError):
    """The budget is below the smallest candidate of every layer together."""

    def __init__(self, budget: int, minimum: int, message: str | None = None):
        self.budget, self.minimum = budget, minimum
        super().__init__(message or f"budget of {budget:,} bytes is below the smallest candidates of all layers "
                                    f"together: at least {minimum:,} bytes are needed")


def minimum_bytes(layers: Mapping[str, Sequence[Choice]]) -> int:
    """The smallest budget any allocation fits in."""
    return sum(min(c.nbytes for c in cands) for cands in layers.values())


def total(allocation: Mapping[str, Choice]) -> tuple[int, float]:
    """``(bytes, predicted loss)`` of an allocation."""
    return sum(c.nbytes for c in allocation.values()), float(sum(c.loss for c in allocation.values()))


def _check(layers: Mapping[str, Sequence[Choice]], budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be a non-negative number of bytes, got {budget!r}")
    if not layers:
        raise ValueError("nothing to allocate: no layers with candidates")
    for name, cands in layers.items():
        if not cands:
            raise ValueError(f"layer {name} has no candidate precisions")
        for c in cands:
            if not isinstance(c, Choice):
                raise ValueError(f"layer {name}: candidates must be Choice objects, got {c!r}")
            if c.nbytes < 0 or not math.isfinite(c.loss):
                raise ValueError(f"layer {name}, {c.spec}: bytes must be >= 0 and the loss finite "
                                 f"(got {c.nbytes}, {c.loss})")


def allocate(layers: Mapping[str, Sequence[Choice]], budget: int, *,
             resolution: int = DEFAULT_RESOLUTION) -> dict[str, Choice]:
    """The allocation ``{layer: Choice}`` with the lowest summed ``loss`` whose summed ``nbytes`` is
    at most ``budget`` (module docs for exactness).  Ties go to the fewer bytes."""
    _check(layers, budget)
    budget = int(budget)
    need = minimum_bytes(layers)
    if need > budget:
        raise InfeasibleBudget(budget, need)
    names = list(layers)
    sizes = [c.nbytes for cands in layers.values() for c in cands]
    unit = math.gcd(budget, *sizes) or 1
    if budget // unit > resolution:
        unit = -(-budget // resolution)
    cap = budget // unit
    # with rounded-up sizes the smallest candidates may no longer fit: keep the minimum feasible
    units = {n: [-(-c.nbytes // unit) for c in layers[n]] for n in names}
    if sum(min(u) for u in units.values()) > cap:
        return {n: min(layers[n], key=lambda c: (c.nbytes, c.loss)) for n in names}

    best = np.zeros(cap + 1)  # best[c]: lowest loss of the layers so far within c units
    back = np.zeros((len(names), cap + 1), np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, np.inf)
        for j, (c, w) in enumerate(zip(layers[n], units[n])):
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + c.loss
            take = cand < new
            new[take], back[i, take] = cand[take], j
        best = new
    out, c = {}, int(np.argmin(best))  # lowest loss; argmin takes the fewest units on a tie
    for i in range(len(names) - 1, -1, -1):
        j = int(back[i, c])
        out[names[i]] = layers[names[i]][j]
        c -= units[names[i]][j]
    return {n: out[n] for n in names}


def budget_from_avg_bits(report, avg_bits: float) -> int:
    """The bytes ``avg_bits`` per weight give the report's units (scales and zero points count)."""
    if not (isinstance(avg_bits, (int, float)) and 0 < avg_bits <= 32):
        raise ValueError(f"average bits must be in (0, 32], got {avg_bits!r}")
    return int(avg_bits * sum(report.params.values()) / 8)


def auto_rules(report, budget: int) -> tuple[PrecisionRules, dict]:
    """Rules giving each unit of ``report`` the candidate the knapsack picks under ``budget`` bytes
    (for the units' weights; norms stay bf16), and a summary: per unit its
    spec, bytes and predicted KL, and the totals (``predicted_kl``, ``bytes``, ``avg_bits``)."""
    layers: dict[str, list] = {}
    for r in report.rows:
        layers.setdefault(r.unit, []).append(Choice(spec=r.spec, nbytes=r.nbytes, loss=r.kl))
    picked = allocate(layers, budget)
    rules = [(f"^{re.escape(p)}$", choice.spec) for unit, choice in picked.items() for p in report.units[unit]]
    nbytes = sum(c.nbytes for c in picked.values())
    summary = {"budget": int(budget), "bytes": nbytes, "avg_bits": 8 * nbytes / sum(report.params.values()),
               # fsum: exactly rounded, so the total does not depend on the units' order (a sensitivity
               # report read back from JSON lists them in another order than a fresh one)
               "predicted_kl": math.fsum(float(c.loss) for c in picked.values()),
               "units": {u: {"spec": c.spec, "bytes": c.nbytes, "kl": c.loss} for u, c in picked.items()}}
    return PrecisionRules(rules=tuple(rules), default=None), summary
