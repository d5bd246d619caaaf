"""Where the user's routing table lives: `$FP8DISPATCH_TUNING`, else the per-user cache.

No torch here: `fp8dispatch tune --help` names the variable without importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FP8DISPATCH_TUNING"
DISABLED = ("off", "0", "none", "false", "no")
CACHE_FILE = "fp8dispatch/routing.json"  # under $XDG_CACHE_HOME, else ~/.cache


def user_path() -> Path | None:
    """The user's table: FP8DISPATCH_TUNING, else the per-user cache; None when tuning is off."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in DISABLED:
        return None
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / CACHE_FILE
