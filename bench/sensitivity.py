"""The text and chart of a sensitivity report and of an automatic precision plan: the rendering
the ``cascade sensitivity`` and ``cascade quantize --quant auto`` commands print (the measurement
is :mod:`cascade.models.sensitivity`, the plan :mod:`cascade.models.workflow`)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cascade.models.sensitivity import SensitivityReport


def summary_text(summary: dict) -> str:
    """Human lines for :func:`cascade.models.workflow.plan_rules`' summary: the precision mix, bytes,
    predicted and measured KL."""
    mix = Counter(u["spec"] for u in summary["units"].values())
    line = (f"auto precision: {', '.join(f'{n} x {s}' for s, n in mix.most_common())}; "
            f"{summary['avg_bits']:.3f} bits a weight, {summary['model_bytes']:,} bytes of weights "
            f"(budget {summary['budget']:,} for the matrices); predicted KL {summary['predicted_kl']:.4f}")
    if "measured_kl" in summary:
        line += f", measured {summary['measured_kl']:.4f}"
    return line


def plot(report: SensitivityReport, png_path: str) -> bool:
    """A bar chart of the measured KL per unit (one bar per candidate, log scale) to ``png_path``;
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    units = list(report.units)
    specs = list(dict.fromkeys(r.spec for r in report.rows))
    kl = {(r.unit, r.spec): r.kl for r in report.rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(units) * max(1, len(specs) / 3)), 4.5))
    width = 0.8 / len(specs)
    x = np.arange(len(units))
    for j, spec in enumerate(specs):
        ax.bar(x + j * width, [max(kl[(u, spec)], 1e-9) for u in units], width, label=spec)
    ax.set_yscale("log")
    ax.set_ylabel("mean KL to the float model")
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([u.removesuffix("/kernel") for u in units], rotation=90, fontsize=6)
    ax.set_title(f"Sensitivity: one {report.granularity} quantized at a time ({report.tokens:,} tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def table(report: SensitivityReport, limit: int | None = None) -> str:
    """Units sorted by their KL at the lowest-precision candidate, one column per candidate."""
    specs = list(dict.fromkeys(r.spec for r in report.rows))
    kl = {(r.unit, r.spec): r.kl for r in report.rows}
    last = specs[-1]
    units = sorted(report.units, key=lambda u: -kl[(u, last)])
    head = f"| {report.granularity} | weights | " + " | ".join(f"KL {s}" for s in specs) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(specs)]
    for u in units[:limit]:
        lines.append(f"| {u} | {report.params[u]:,} | " + " | ".join(f"{kl[(u, s)]:.2e}" for s in specs) + " |")
    if limit is not None and len(units) > limit:
        lines.append(f"... {len(units) - limit} more (--json for all)")
    rc = report.rank_correlation
    lines.append(f"{report.tokens:,} tokens; float loss {report.base_loss:.4f}"
                 + (f"; proxy vs KL rank correlation {rc:.3f}" if rc is not None else ""))
    return "\n".join(lines)
