"""Checkpoints: atomic, resumable, and loaded without unpickling code.

A checkpoint is a dict of tensors, numbers, strings and nested dicts/lists only (model, optimisers,
schedulers, RNG states, config, epoch, MLflow run id), so ``torch.load(weights_only=True)`` reads it.
It is written to a temporary file in the same folder, fsynced, then renamed over the old one: a crash
leaves either the previous checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`; a corrupt file or one holding code is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (truncated zip), EOFError...
        why = f"{type(err).__name__}: {err}"
        raise ValueError(f"checkpoint {path} is corrupt or not a brainlatent checkpoint ({why})") from None
    if not isinstance(ckpt, dict):  # e.g. a bare tensor or number saved with torch.save
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__!r}, not a brainlatent training checkpoint")
    missing = {"model", "epoch", "config", "family"} - set(ckpt)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}: not a brainlatent training checkpoint")
    return ckpt
