"""Each latent direction's group difference map, as the report shows it: a glass-brain PNG and an interactive
viewer (nilearn), read from the NIfTI maps the directions stage wrote (``directions/<family>/maps/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brainlatent.viz.traversal import save_glass_brain, signed_map
from brainlatent.viz.viewer import viewer_iframe, viewer_page

# What the directions stage writes per direction (directions/experiment.py write_study): maps/<name>_<kind>.nii.gz
MAP_KIND = "mean_difference"
MAP_LABEL = "mean intensity difference, last - first step"


@dataclass(frozen=True)
class DirectionMap:
    family: str
    name: str  # the direction, e.g. "age_old"
    nifti: Path
    glass_png: Path
    viewer: str  # an <iframe srcdoc> element holding nilearn's offline viewer


def find_maps(directions_dir: Path, kind: str = MAP_KIND) -> dict[str, Path]:
    """``{direction name: maps/<name>_<kind>.nii.gz}`` of one family's directions folder (empty if none)."""
    suffix = f"_{kind}.nii.gz"
    return {p.name[: -len(suffix)]: p for p in sorted((directions_dir / "maps").glob(f"*{suffix}"))}


def render_direction_maps(family: str, directions_dir: Path, out_dir: Path,
                          background: np.ndarray | None = None) -> list[DirectionMap]:
    """Glass brain (``out_dir/<family>/<name>_glass.png``) and viewer of every mean-difference map of
    ``directions_dir``, over ``background`` (X, Y, Z) on the maps' grid when given (a mismatched one is
    ValueError, naming the map)."""
    out = []
    for name, path in find_maps(directions_dir).items():
        try:
            img = nib.load(path)
            stat = np.asarray(img.get_fdata(dtype=np.float32))
        except Exception as err:  # nibabel raises many types for a damaged file
            raise ValueError(f"{path}: not a readable NIfTI map ({err})") from None
        if background is not None and background.shape != stat.shape:
            raise ValueError(f"{path}: map shape {stat.shape} does not match the background {background.shape}")
        title = f"{family} {name}"
        m = signed_map(stat, str(path), affine=img.affine, voxel_mm=None, vmax=None, threshold=None)
        png = save_glass_brain(m, out_dir / family / f"{name}_glass.png", title=title, label=MAP_LABEL)
        page = viewer_page(stat, affine=img.affine, background=background, title=title)
        out.append(DirectionMap(family, name, path, png, viewer_iframe(page, title=f"{title}: {MAP_LABEL}")))
    return out
