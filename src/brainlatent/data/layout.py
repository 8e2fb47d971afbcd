"""The processed folder's contract, shared by its writer (``preprocess``) and its readers (``dataset``).

Kept free of imaging libraries so that training, which only reads processed folders, imports no nibabel or
nilearn: the GPU check (benchmarks/gpu_check.py) runs the training steps on a machine that has neither.
"""

from __future__ import annotations

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
# brain_mask_volume_mm3: the native mask's volume (contains any local effect that adds brain volume);
# etiv_mm3: the template's intracranial volume over the determinant of the affine registration to it.
SUBJECT_COLUMNS: tuple[str, ...] = (
    "index", "subject_id", "sex", "age_group", "age", "brain_mask_volume_mm3", "etiv_mm3", "split",
    "center_x_mm", "center_y_mm", "center_z_mm",
)  # fmt: skip
VOLUME_DTYPE = np.float16
