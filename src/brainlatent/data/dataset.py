"""Read access to a processed folder (written by ``prepare``) and the torch dataset on top of it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from brainlatent.data.preprocess import SPLITS, SUBJECT_COLUMNS
from brainlatent.grid import Grid

REQUIRED_FILES: tuple[str, ...] = ("volumes.npy", "subjects.csv", "grid.json")


@dataclass(frozen=True)
class ProcessedData:
    """A processed folder: memory-mapped volumes, the subjects table, the reference grid."""

    root: Path
    volumes: np.ndarray  # (N, X, Y, Z) float16 memmap, values in [0, 1]
    subjects: pd.DataFrame  # contract columns (SUBJECT_COLUMNS) + given covariates, row i describes volumes[i]
    grid: Grid

    @classmethod
    def open(cls, processed_dir: str | Path) -> "ProcessedData":
        """Open ``processed_dir``; ValueError naming what is missing or inconsistent."""
        root = Path(processed_dir)
        if not root.is_dir():
            raise ValueError(f"processed data folder not found: {root} (run `brainlatent prepare`)")
        missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
        if missing:
            raise ValueError(f"{root}: incomplete processed folder, missing {missing} (re-run `brainlatent prepare`)")
        volumes = np.load(root / "volumes.npy", mmap_mode="r")
        subjects = pd.read_csv(root / "subjects.csv", dtype={"subject_id": str})
        grid = Grid.load(root / "grid.json")
        absent = [c for c in SUBJECT_COLUMNS if c not in subjects.columns]
        if absent:
            raise ValueError(
                f"{root / 'subjects.csv'}: missing column(s) {absent}: written by an older `prepare` (the native "
                "mask volume is now brain_mask_volume_mm3, with etiv_mm3 beside it); re-run `brainlatent prepare` "
                "(or `dvc repro prepare`)"
            )
        if volumes.ndim != 4 or volumes.shape[0] != len(subjects) or tuple(volumes.shape[1:]) != grid.shape:
            raise ValueError(
                f"{root}: volumes.npy has shape {volumes.shape}, expected ({len(subjects)}, *{grid.shape}) "
                "from subjects.csv and grid.json"
            )
        if not np.array_equal(subjects["index"].to_numpy(), np.arange(len(subjects))):
            raise ValueError(f"{root / 'subjects.csv'}: column 'index' must be 0..N-1 in order")
        return cls(root, volumes, subjects, grid)

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def ground_truth_dir(self) -> Path | None:
        """``<processed>/ground_truth`` for a synthetic cohort or a positive control, else None."""
        path = self.root / "ground_truth"
        return path if path.is_dir() else None

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices (into ``volumes`` and ``subjects``) of ``split`` (train, val or test), ascending."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return np.flatnonzero(self.subjects["split"].to_numpy() == split)

    def load_split(self, split: str) -> torch.Tensor:
        """The whole split as one (n, 1, X, Y, Z) float32 tensor: tiny data trains fastest from memory."""
        idx = self.split_indices(split)
        return torch.from_numpy(np.asarray(self.volumes[idx], dtype=np.float32)).unsqueeze(1)


class VolumeDataset(Dataset):
    """Items ``(volume (1, X, Y, Z) float32, row index)`` of one split, read lazily from the memmap."""

    def __init__(self, data: ProcessedData, split: str) -> None:
        self.data = data
        self.indices = data.split_indices(split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[i])
        volume = torch.from_numpy(np.asarray(self.data.volumes[row], dtype=np.float32))
        return volume.unsqueeze(0), row
