"""Where the real models and text for tests live (see that folder's README).

Looked up in order: the folder named by ``CASCADE_SHARED_DATA``; ``../shared/data`` beside the
repository (the documented layout); ``/work/shared/data`` (where this workplace mounts it, for a
clean clone made elsewhere, e.g. ``/tmp/ci``).  Tests use the files by path and fail, never skip,
when they are missing: they are part of what the suite checks.
"""

import os
from pathlib import Path

_CANDIDATES = [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data")]
DATA = Path(os.environ["CASCADE_SHARED_DATA"]) if os.environ.get("CASCADE_SHARED_DATA") else next(
    (p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
