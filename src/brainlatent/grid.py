"""The voxel grid every processed volume lives on: shape, voxel size and a RAS affine.

Preprocessing resamples each brain onto a box of fixed size in millimetres (``fov_mm``) centred on that
brain's centre of mass, so all subjects share one array shape and one voxel size and head size survives.
``Grid.affine`` is the *reference* affine written into every NIfTI we produce (samples, reconstructions,
traversals): the same box centred on the cohort's mean brain centre. Template-space atlases (ventricle
ROI, effect maps) are mapped onto the grid with :meth:`Grid.centered_at` at the template brain's centre.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) voxel -> RAS world (mm); diagonal, positive voxel sizes

    @classmethod
    def box(cls, shape, fov_mm, center_mm) -> "Grid":
        """A RAS-aligned box of ``fov_mm`` sampled on ``shape`` voxels whose centre is ``center_mm``."""
        shape = tuple(int(s) for s in shape)
        voxel = np.asarray(fov_mm, float) / np.asarray(shape, float)
        affine = np.diag([*voxel, 1.0])
        # World position of the array centre ((n-1)/2 in voxel coordinates) is center_mm.
        affine[:3, 3] = np.asarray(center_mm, float) - voxel * (np.asarray(shape) - 1) / 2.0
        return cls(shape, affine)

    @property
    def voxel_mm(self) -> np.ndarray:
        return np.abs(np.diag(self.affine)[:3])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.voxel_mm))

    @property
    def fov_mm(self) -> np.ndarray:
        return self.voxel_mm * np.asarray(self.shape)

    @property
    def center_mm(self) -> np.ndarray:
        return self.affine[:3, :3] @ ((np.asarray(self.shape) - 1) / 2.0) + self.affine[:3, 3]

    def centered_at(self, center_mm) -> "Grid":
        return Grid.box(self.shape, self.fov_mm, center_mm)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "voxel_mm": self.voxel_mm.tolist(),
            "fov_mm": self.fov_mm.tolist(),
            "center_mm": self.center_mm.tolist(),
            "affine": self.affine.tolist(),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "Grid":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            return cls(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], float))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a valid grid description ({err})") from None
