"""JAX's persistent compilation cache in cascade's own cache directory: a second identical run
loads its compiled programs from disk instead of compiling them again.

Most of a short run's wall time is XLA compilation (``cascade run Hi --max-tokens 1`` on two
CPU cores: 8.4 s with an empty cache, 3.6 s with a full one; README, "Compilation cache").
:func:`enable_compile_cache` points JAX's persistent cache at :func:`compile_cache_dir` and
lowers its thresholds so that every program is kept, however small or quick to compile (JAX's
default keeps only those that took 1 s or more; the decode step of a tiny model takes less, and
a run is many of them).  The command line calls it first thing
(``cascade.cli.main``); a Python program calls it once, before its first model call::

    import cascade
    cascade.enable_compile_cache()      # returns the directory, or None when turned off

Where: ``$CASCADE_HOME/jax-cache`` if ``CASCADE_HOME`` is set, else
``$XDG_CACHE_HOME/cascade/jax-cache`` (default ``~/.cache/cascade/jax-cache``).  Delete it at any
time to reclaim the space; it grows by a few kilobytes per program compiled.
``CASCADE_NO_COMPILE_CACHE=1`` turns it off.  A cache directory configured in JAX itself
(``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) is left as it is.

Executables that call the native CPU kernels (XLA FFI custom calls) are cached like any other:
a custom call is stored by its target name and resolved when the program loads, and the targets
are registered while the program is traced, before JAX looks it up in the cache.
"""

from __future__ import annotations

import os
import warnings

DISABLE_ENV = "CASCADE_NO_COMPILE_CACHE"
HOME_ENV = "CASCADE_HOME"
SUBDIR = "jax-cache"
_OFF, _ON = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")

_ours: str | None = None  # the directory this module set in jax.config (None: it set none)
_saved: dict = {}  # the thresholds it replaced, restored when it turns the cache off


def cascade_home() -> str:
    """cascade's own cache directory: ``$CASCADE_HOME``, else ``$XDG_CACHE_HOME/cascade`` (default
    ``~/.cache/cascade``)."""
    home = os.environ.get(HOME_ENV, "").strip()
    if home:
        return os.path.abspath(os.path.expanduser(home))
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cascade")


def disabled() -> bool:
    """Whether ``CASCADE_NO_COMPILE_CACHE`` turns the cache off (1, true, yes, on); ValueError for
    a value that is none of those nor 0, false, no, off or empty."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(f"{DISABLE_ENV}={os.environ[DISABLE_ENV]!r}: use 1 to turn the compilation cache off, "
                         "0 to keep it on")
    return value in _OFF


def compile_cache_dir() -> str | None:
    """The directory :func:`enable_compile_cache` uses (``cascade_home()/jax-cache``), or None when
    ``CASCADE_NO_COMPILE_CACHE`` turns it off."""
    return None if disabled() else os.path.join(cascade_home(), SUBDIR)


def enable_compile_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`compile_cache_dir`)
    for every program compiled from now on in this process, and return the directory in use.

    Returns None (and turns off a cache this function turned on earlier) when
    ``CASCADE_NO_COMPILE_CACHE`` is set, or with a warning when the directory cannot be created.
    A directory set in JAX by other means is kept and returned.  Calling it again is cheap; a
    changed ``CASCADE_HOME`` moves the cache.
    """
    global _ours
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if current is not None and current != _ours:  # the user's own JAX setting
        return current
    want = None if disabled() else os.path.abspath(path or compile_cache_dir())
    if want == current:
        return want
    if want is not None:
        try:
            os.makedirs(want, exist_ok=True)
        except OSError as e:  # a read-only home: run without the cache, and say so
            warnings.warn(f"compilation cache off: cannot create {want} ({e.strerror or e}); "
                          f"set {HOME_ENV} to a writable directory, or {DISABLE_ENV}=1", stacklevel=2)
            want = None
    if want is None:
        jax.config.update("jax_compilation_cache_dir", None)
        for name, value in _saved.items():
            jax.config.update(name, value)
        _saved.clear()
    else:
        for name, value in (("jax_persistent_cache_min_compile_time_secs", 0.0),
                            ("jax_persistent_cache_min_entry_size_bytes", 0)):
            _saved.setdefault(name, getattr(jax.config, name))
            jax.config.update(name, value)
        jax.config.update("jax_compilation_cache_dir", want)
    compilation_cache.reset_cache()  # the next compilation opens the new directory (or none)
    _ours = want
    return want
