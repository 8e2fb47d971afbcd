"""Brain maps as the report shows them, a glass-brain PNG and an interactive viewer (nilearn) each: every latent
direction's group difference map (the NIfTIs the directions stage wrote, ``directions/<family>/maps/``) and
the effects planted into a synthetic cohort (``data/processed/ground_truth/``), to hold them against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brainlatent.grid import Grid
from brainlatent.viz.traversal import save_glass_brain, signed_map
from brainlatent.viz.viewer import viewer_iframe, viewer_page

# What the directions stage writes per direction (directions/experiment.py write_study): maps/<name>_<kind>.nii.gz
MAP_KIND = "mean_difference"
MAP_LABEL = "mean intensity difference, last - first step"
PLANTED_LABEL = "planted intensity change (synthetic cohort's units)"


@dataclass(frozen=True)
class ReportMap:
    family: str  # the model family, or "planted" for the cohort's ground truth
    name: str  # the direction (e.g. "age_old") or the planted effect (e.g. "age")
    nifti: Path
    glass_png: Path
    viewer: str  # an <iframe srcdoc> element holding nilearn's offline viewer


def find_maps(directions_dir: Path, kind: str = MAP_KIND) -> dict[str, Path]:
    """``{direction name: maps/<name>_<kind>.nii.gz}`` of one family's directions folder (empty if none)."""
    suffix = f"_{kind}.nii.gz"
    return {p.name[: -len(suffix)]: p for p in sorted((directions_dir / "maps").glob(f"*{suffix}"))}


def render_direction_maps(family: str, directions_dir: Path, out_dir: Path,
                          background: np.ndarray | None = None) -> list[ReportMap]:
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
        out.append(_render(family, name, path, stat, img.affine, out_dir, background, MAP_LABEL))
    return out


def render_planted_maps(ground_truth_dir: Path, grid: Grid, out_dir: Path, background: np.ndarray | None = None,
                        files: dict[str, str] | None = None) -> list[ReportMap]:
    """The same for the planted effect maps of ``ground_truth_dir`` (``files``: name -> file, default
    ``GROUND_TRUTH_MAPS``; missing ones skipped), resampled onto ``grid`` as the directions stage compares
    them (:func:`brainlatent.anatomy.load_effect_map`), under ``out_dir/planted/``."""
    from brainlatent.anatomy import load_effect_map, load_template
    from brainlatent.directions.experiment import GROUND_TRUTH_MAPS

    placed = grid.centered_at(load_template().center_mm)  # where load_effect_map puts a template-space map
    out = []
    for name, fname in (files or GROUND_TRUTH_MAPS).items():
        path = ground_truth_dir / fname
        if path.is_file():
            stat = load_effect_map(path, grid)
            out.append(_render("planted", name, path, stat, placed.affine, out_dir, background, PLANTED_LABEL))
    return out


def _render(group: str, name: str, path: Path, stat: np.ndarray, affine: np.ndarray, out_dir: Path,
            background: np.ndarray | None, label: str) -> ReportMap:
    title = f"{group} {name}"
    m = signed_map(stat, str(path), affine=affine, voxel_mm=None, vmax=None, threshold=None)
    png = save_glass_brain(m, out_dir / group / f"{name}_glass.png", title=title, label=label)
    page = viewer_page(stat, affine=affine, background=background, title=title)
    return ReportMap(group, name, path, png, viewer_iframe(page, title=f"{title}: {label}"))
