"""What the library and the CLI print for a person on stderr: progress of long work, and counts.

:func:`progress_bar` is the one progress display of every command and library loop.  On a
terminal it is a tqdm bar.  Anywhere else (stderr redirected to a log file, a pipe, a CI job) a
bar redrawn with carriage returns is noise and no output at all looks like a hang, so it prints a
plain line at most every :data:`DEFAULT_INTERVAL` seconds while the work runs::

    qat: 120/500 steps (24%), 3.1 s/step, eta 19m 38s, loss=2.345

and one final line (``qat: 500/500 steps in 25m 50s (3.1 s/step), loss=1.987``).  Work that ends
within the interval prints nothing.  Progress never goes to stdout (``--json`` prints only its
object there).  Two environment variables change it:

- ``CASCADE_PROGRESS``: ``auto`` (the default: a bar on a terminal, plain lines elsewhere),
  ``plain`` (plain lines on a terminal too) or ``off`` (no progress at all);
- ``CASCADE_PROGRESS_INTERVAL``: seconds between plain lines (default 30; 0 prints a line per step).

:func:`plural` writes a count with its noun ("1 round", "2 rounds") for every message that counts,
and :func:`format_table` lays out every table a command or a benchmark prints: cells formatted by
the caller, columns as wide as their widest cell, text left and numbers right::

    spec         ppl  weight bytes
    fp32      5.1234     1,048,576
    int4-g32  5.3012       163,840

This module is a leaf (the standard library and tqdm only), so every layer may import it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Iterable, Sequence

DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines off a terminal
MODES = ("auto", "plain", "off")


def plural(n: int | float, noun: str, plural_form: str | None = None) -> str:
    """``n`` and ``noun``, the noun in the plural unless ``n`` is 1: ``plural(1, "round")`` is
    "1 round", ``plural(1200, "token")`` "1,200 tokens", ``plural(2, "matrix", "matrices")``
    "2 matrices"."""
    number = f"{n:,}" if isinstance(n, int) else f"{n:g}"
    return f"{number} {_noun(n, noun, plural_form)}"


def _noun(n, noun: str, plural_form: str | None = None) -> str:
    return noun if n == 1 else (plural_form or noun + "s")


def format_table(rows: Iterable[Sequence], columns: Sequence[str] | None = None, *, align: str | None = None,
                 indent: str = "", sep: str = "  ") -> str:
    """``rows`` (sequences of cells, each already formatted: ``f"{ppl:.3f}"``; anything else is
    ``str``-ed) under the header ``columns`` (None: no header), one line each.  ``align`` holds one
    character per column, ``<`` (left) or ``>`` (right) [default: the first column left, the rest
    right]; each column is as wide as its widest cell, columns are joined by ``sep`` and every line
    starts with ``indent`` and ends without trailing spaces."""
    table = [[str(c) for c in row] for row in ([columns] if columns is not None else []) + list(rows)]
    if not table:
        return ""
    n = max(len(row) for row in table)
    align = align or "<" + ">" * (n - 1)
    if len(align) != n or set(align) - {"<", ">"}:
        raise ValueError(f"align {align!r}: give one '<' or '>' per column ({n})")
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(n)]
    return "\n".join((indent + sep.join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths))).rstrip()
                     for row in table)


def progress_mode() -> str:
    """``CASCADE_PROGRESS`` (``auto``, ``plain`` or ``off``); ValueError for any other value."""
    mode = os.environ.get("CASCADE_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"CASCADE_PROGRESS={os.environ['CASCADE_PROGRESS']!r}: use one of {', '.join(MODES)}")
    return mode


def progress_interval() -> float:
    """``CASCADE_PROGRESS_INTERVAL`` in seconds (default :data:`DEFAULT_INTERVAL`); ValueError
    unless it is a finite number >= 0."""
    text = os.environ.get("CASCADE_PROGRESS_INTERVAL", "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"CASCADE_PROGRESS_INTERVAL={text!r}: give seconds between progress lines, a number >= 0")
    return value


def check_environment() -> None:
    """Validate both environment variables up front (the CLI calls it before any work)."""
    progress_mode()
    progress_interval()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "step",
                 enabled: bool | None = None, leave: bool = True, initial: int = 0, file=None,
                 clock: Callable[[], float] | None = None, interval: float | None = None):
    """A progress display over ``iterable`` (iterate it) or of ``total`` steps (call ``update(n)``);
    both forms have ``set_postfix(**values)`` and ``close()`` and work as context managers.

    ``enabled``: False shows nothing; None or True show progress as the module docs say (a tqdm
    bar on a terminal, throttled plain lines elsewhere).  ``leave``: keep the bar on the terminal
    when done.  ``initial``: steps already done (a resumed run).  ``file`` (default
    ``sys.stderr`` now), ``clock`` (default ``time.monotonic``) and ``interval`` (default
    ``CASCADE_PROGRESS_INTERVAL``) are for tests.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    mode = progress_mode()
    if enabled is False or mode == "off":
        return _Quiet(iterable, total, initial)
    file = sys.stderr if file is None else file
    if mode == "auto":
        from tqdm.auto import tqdm
        from tqdm.autonotebook import tqdm as chosen  # tqdm.notebook's widget in a Jupyter kernel

        if _isatty(file) or chosen.__module__ == "tqdm.notebook":
            return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial, file=file,
                        dynamic_ncols=True)
    return _Lines(iterable, total, initial, desc=desc, unit=unit, file=file, clock=clock or time.monotonic,
                  interval=progress_interval() if interval is None else interval)


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class _Quiet:
    """No display: counts steps and passes the iterable through."""

    def __init__(self, iterable, total, initial):
        self.iterable, self.total, self.n = iterable, total, initial
        self.postfix: dict = {}

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lines(_Quiet):
    """Plain progress lines, at most one per ``interval`` seconds, and a final line when the work
    took at least that long (or a line was printed)."""

    def __init__(self, iterable, total, initial, *, desc, unit, file, clock, interval):
        super().__init__(iterable, total, initial)
        self.desc, self.unit, self.file, self.clock, self.interval = desc, unit, file, clock, interval
        self.start = self.last = clock()
        self.initial, self.printed, self.closed = initial, False, False

    def update(self, n: int = 1) -> None:
        super().update(n)
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._print(self._line(now))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        if self.printed or now - self.start >= self.interval:
            self._print(self._final(now))

    def _print(self, line: str) -> None:
        self.printed = True
        print(line, file=self.file, flush=True)

    def _count(self) -> str:
        if self.total is None:
            return plural(self.n, self.unit)
        return f"{self.n:,}/{self.total:,} {_noun(self.total, self.unit)}"

    def _rate(self, elapsed: float) -> str | None:
        done = self.n - self.initial
        if done <= 0 or elapsed <= 0:
            return None
        per = elapsed / done
        return f"{per:.3g} s/{self.unit}" if per >= 1 else f"{1 / per:.3g} {_noun(2, self.unit)}/s"

    def _postfix(self) -> str:
        return "".join(f", {k}={v}" for k, v in self.postfix.items())

    def _prefix(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        parts = [self._count()]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        rate = self._rate(elapsed)
        if rate:
            parts.append(rate)
            if self.total and self.n < self.total:
                parts.append(f"eta {duration(elapsed / (self.n - self.initial) * (self.total - self.n))}")
        else:
            parts.append(f"{duration(elapsed)} elapsed")
        return self._prefix() + ", ".join(parts) + self._postfix()

    def _final(self, now: float) -> str:
        elapsed = now - self.start
        if self.total is not None and self.n < self.total:
            return f"{self._prefix()}stopped at {self._count()} after {duration(elapsed)}{self._postfix()}"
        rate = self._rate(elapsed)
        return f"{self._prefix()}{self._count()} in {duration(elapsed)}{f' ({rate})' if rate else ''}{self._postfix()}"


def duration(seconds: float) -> str:
    """``seconds`` for a person: "4.2s", "19m 38s", "2h 05m"."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
