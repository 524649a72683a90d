"""What a converted folder is called and which layout it holds: no JAX needed to ask.

The CLI checks these before it decides to reuse a conversion, and must stay
quick to start, so they live apart from the (JAX-importing) reader and writer.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST_FILE = "sgljax-manifest.json"
COMMIT_FILE = "sgljax-commit"
FORMAT_VERSION = 2  # 2: linear weights (out, in), as HF stores them; 1: (in, out)


def stored_format(folder: Path) -> int | None:
    """The format of the conversion in ``folder``; None when there is none to read."""
    try:
        return json.loads((Path(folder) / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
