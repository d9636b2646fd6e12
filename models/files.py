"""Atomic writes: a reader (or the next run) sees a whole file or directory, or the old one, never half.

Every write goes to a hidden sibling of its target, ``.NAME.tmp-PID-XXXXXXXX`` (the writer's
process id and 8 random hex digits), which is renamed onto the target only when complete; a
failed write removes it, so the target is untouched.  A rename within one directory is atomic
on POSIX, which is why the temporary lives beside its target and not in ``/tmp``.

- :func:`atomic_open` / :func:`write_text` / :func:`write_json`: one file (results, reports,
  logs rewritten in place); :func:`atomic_path` for a writer that opens the file itself;
- :func:`replace_directory`: a finished directory (a checkpoint, an exported model) installed
  over an existing one, which is moved aside to ``.NAME.old-PID-XXXXXXXX`` first, put back if the
  rename fails, and removed after.

:data:`SIDE_PATH` matches both side names, so :func:`cascade.models.checkpoint.recover_interrupted_save`
can clean up after a writer killed outright.  This module is a leaf (the standard library only):
every layer above ``quant/`` may import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil

SIDE_PATH = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def side_path(target: str, kind: str) -> str:
    """The hidden sibling ``.NAME.KIND-PID-XXXXXXXX`` of ``target`` (``kind``: ``tmp`` or ``old``)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(target)))
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path):
    """A temporary sibling's path for a writer that opens files itself (e.g. ``gguf.GGUFWriter``):
    when the block ends, the file there is flushed to disk and renamed onto ``path``.  If the block
    raises, the temporary is removed and ``path`` keeps what it held.  An ``OSError`` becomes one
    naming ``path``: ``cannot write PATH: REASON``."""
    path = os.fspath(path)
    tmp = side_path(path, "tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """Open a temporary sibling of ``path`` for writing (``open``'s ``mode`` and keywords; text
    defaults to UTF-8); when the block ends, flush it to disk and rename it onto ``path``
    (:func:`atomic_path`).  If the block (or the write) raises, the temporary is removed and
    ``path`` keeps what it held.  An ``OSError`` becomes one naming ``path``."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)


def write_json(path, obj, **dumps) -> None:
    """Write ``obj`` as JSON (``json.dumps`` keywords; default ``indent=2``) and a newline, atomically."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n")


def replace_directory(tmp: str, target: str) -> None:
    """Rename the finished directory ``tmp`` onto ``target`` (a sibling of it).  An existing
    ``target`` is first moved aside to its ``.old`` sibling, renamed back if installing ``tmp``
    fails, and deleted once ``tmp`` is in place; so ``target`` is at every moment the old
    directory, the new one, or (only if this process is killed between the two renames) absent
    with the old one beside it for :func:`cascade.models.checkpoint.recover_interrupted_save`."""
    old = None
    if os.path.lexists(target):
        old = side_path(target, "old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(target)))
    if old is not None:
        remove(old)


def remove(path: str) -> None:
    """Delete a file, a link or a directory tree; what cannot be removed is left."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
