"""Where the real models and text for tests live: ``../shared/data`` beside the repository
(see its README), or the folder named by ``CASCADE_SHARED_DATA``.  Tests use them by path and
fail (never skip) when they are missing: they are part of what the suite checks."""

import os
from pathlib import Path

DATA = Path(os.environ.get("CASCADE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
