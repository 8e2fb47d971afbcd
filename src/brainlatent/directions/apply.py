"""Kept for existing imports (``cli.py``, notebooks/03, user code): the three jobs it held now live in their own
files, :mod:`.codec` (``LatentCodec``), :mod:`.lookup` (the direction look-up) and :mod:`.scan`
(``traverse_scan``). New code imports from those."""

from .codec import LatentCodec
from .lookup import DIRECTION_ALIASES, DIRECTIONS_ARTIFACT_DIR, directions_dir, load_direction
from .scan import traverse_scan

__all__ = ["DIRECTIONS_ARTIFACT_DIR", "DIRECTION_ALIASES", "LatentCodec", "directions_dir",
           "load_direction", "traverse_scan"]
