"""File modes of the index: every file readable by whoever can read the index's directory."""

from __future__ import annotations

import os
from pathlib import Path


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give `path` the mode a plain `open(..., "w")` would (0666 less the umask): safetensors
    writes its files 0600, which left an index's curvature, factors and projections readable by
    their owner only while every other file of the index followed the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(Path(path), 0o666 & ~mask)
