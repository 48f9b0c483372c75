"""Where hf_kd keeps what it builds once (converted models, teacher caches, generated data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$HF_KD_CACHE``, else ``$HF_HOME/hf_kd``, else ``~/.cache/hf_kd`` (not created here)."""
    if os.environ.get("HF_KD_CACHE"):
        return Path(os.environ["HF_KD_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hf_kd"
    return Path.home() / ".cache" / "hf_kd"
