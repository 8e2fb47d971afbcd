"""``traverse_scan``: move a user's scan along a direction fitted by the ``directions`` stage for the same model
version.

The scan is preprocessed exactly like ``prepare`` (``preprocess_image`` with ``params.data``), encoded, moved,
decoded, and written as one NIfTI per step plus a PNG strip. Outputs sit in the scan's own world space (the
processing box centred on its brain), so they overlay the input in a viewer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainlatent import registry, tracking
from brainlatent.config import Params
from brainlatent.data.preprocess import BadInputError, preprocess_image, read_brain, subject_grid
from brainlatent.grid import Grid

from .codec import LatentCodec
from .direction import Direction
from .lookup import load_direction
from .traversal import traverse

log = logging.getLogger(__name__)


def _steps(steps: Sequence[float]) -> np.ndarray:
    arr = np.asarray(list(steps), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"steps: expected one or more finite numbers (SD units), got {list(steps)!r}")
    return arr


def _scan_grid(path: Path, params: Params, center_mm: Sequence[float]) -> Grid:
    """The box the scan was resampled onto, in its own world coordinates (where outputs are written)."""
    d = params.data
    if d.fit_bbox:  # the bounding box is not in the QC record: read the brain once more
        return subject_grid(read_brain(path), d.shape, d.fov_mm, True)
    return Grid.box(d.shape, d.fov_mm, center_mm)


@dataclass(frozen=True)
class FittedDirection:
    """A model version, one of its directions, and the codec the direction's latents came from."""

    loaded: registry.LoadedModel
    direction: Direction
    codec: LatentCodec


def load_fitted_direction(model_uri: str, direction: str, params: Params, root: Path) -> FittedDirection:
    """Load the model and its direction; a codec that encodes like the cohort was encoded when the direction was
    fitted (same space, same inversion budget: its centre and SD step are statistics of those latents)."""
    from brainlatent.train.device import resolve_device

    tracking.configure(root)
    loaded = registry.load_model(model_uri, resolve_device(params.device))  # names a bad URI / alias
    model = loaded.model
    if tuple(model.volume_shape) != tuple(params.data.shape):
        raise ValueError(f"model {model_uri} expects volumes of shape {tuple(model.volume_shape)}, but params "
                         f"data.shape is {tuple(params.data.shape)}: use the params the model was trained with")
    fitted = load_direction(direction, loaded, root)
    space = fitted.metadata.get("latent_space")
    steps_budget = fitted.metadata.get("inversion_steps") or params.directions.inversion_steps
    codec = LatentCodec.for_model(model, space if space in ("w", "w+") else params.directions.latent_space,
                                  int(steps_budget))
    if fitted.dim != codec.dim:
        raise ValueError(
            f"direction {fitted.name!r} has {fitted.dim} dimensions but {model_uri} ({loaded.name} version "
            f"{loaded.version}) has {codec.describe()} latents: it was fitted for another model version or "
            f"latent size (fitted for {fitted.metadata.get('model_name', '?')} version "
            f"{fitted.metadata.get('model_version', '?')})"
        )
    return FittedDirection(loaded, fitted, codec)


def preprocess_scan(input_path: Path, params: Params) -> tuple[np.ndarray, Grid]:
    """The scan as ``prepare`` would have processed it ``(X, Y, Z)`` float32, and the box it sits in."""
    d = params.data
    try:
        volume, qc = preprocess_image(input_path, d.shape, d.fov_mm, d.intensity_percentiles, d.fit_bbox)
    except BadInputError as err:
        raise ValueError(f"{input_path}: cannot preprocess this scan like `prepare` does: {err}") from None
    if qc.fov_overflow_mm > 0 and not d.fit_bbox:
        log.warning("%s: brain extends %.1f mm beyond data.fov_mm %s (cut off)", input_path, qc.fov_overflow_mm,
                    list(d.fov_mm))
    return volume.astype(np.float32), _scan_grid(input_path, params, qc.center_mm)


def write_scan_traversal(out: Path, input_path: Path, model_uri: str, fd: FittedDirection, volume: np.ndarray,
                         traversal: np.ndarray, steps: np.ndarray, position: float, grid: Grid) -> list[Path]:
    """One NIfTI per step, the preprocessed input, a PNG strip and ``traversal.json`` (provenance)."""
    from brainlatent.viz.montage import save_nifti
    from brainlatent.viz.traversal import save_traversal_strip

    fitted, loaded, codec = fd.direction, fd.loaded, fd.codec
    out.mkdir(parents=True, exist_ok=True)
    written = [
        save_nifti(vol, grid.affine, out / f"{fitted.name}_step{k:02d}_{s:+.2f}sd.nii.gz")
        for k, (vol, s) in enumerate(zip(traversal, steps))
    ]
    written.append(save_nifti(volume, grid.affine, out / "input.nii.gz"))
    title = f"{input_path.name}: {fitted.name} (+ = {fitted.positive}), {loaded.name} v{loaded.version}"
    written.append(save_traversal_strip(traversal, steps, out / f"{fitted.name}_strip.png",
                                        title=title, affine=grid.affine))
    info = {
        "input": str(input_path), "model_uri": model_uri, "model_name": loaded.name,
        "model_version": str(loaded.version), "direction": fitted.name, "positive": fitted.positive,
        "latent_space": codec.latent_space, "inversion_steps": codec.inversion_steps if codec.inverts else None,
        "steps_sd": steps.tolist(), "scan_position_sd": position,
        "files": [p.name for p in written],
    }
    (out / "traversal.json").write_text(json.dumps(info, indent=2))
    written.append(out / "traversal.json")
    return written


def traverse_scan(
    model_uri: str,
    input_path: str | Path,
    direction: str,
    steps: Sequence[float],
    out_dir: str | Path,
    params: Params,
    root: Path | None = None,
) -> list[Path]:
    """Move one brain-extracted T1w scan along a fitted direction; write the decoded steps.

    Args:
        model_uri: ``models:/brainlatent-<family>@<alias>`` or ``models:/<name>/<version>``.
        input_path: a 3D NIfTI, brain-extracted (background 0), any orientation.
        direction: a direction name (see :func:`~brainlatent.directions.lookup.load_direction`) or a
            direction JSON file.
        steps: positions along the direction in SDs of the cohort's projection (e.g. ``-2 -1 0 1 2``),
            relative to the scan's own latent.
        out_dir: created if needed.

    Writes ``<direction>_step<k>_<step>sd.nii.gz`` (one per step, float32 in [0, 1]), ``input.nii.gz`` (the
    preprocessed scan), ``<direction>_strip.png`` and ``traversal.json`` (provenance and where the scan sits
    along the direction). Returns the written paths in that order.
    """
    root = (root or tracking.project_root()).resolve()
    input_path = Path(input_path)
    step_values = _steps(steps)
    if not input_path.is_file():
        raise ValueError(f"input scan not found: {input_path}")
    fd = load_fitted_direction(model_uri, direction, params, root)
    volume, grid = preprocess_scan(input_path, params)

    latent = fd.codec.encode_volumes(volume[None])  # (1, D)
    traversal = traverse(latent, fd.direction, step_values, fd.codec.decode, device=fd.codec.device)[0]
    position = float(fd.direction.project(latent)[0])
    written = write_scan_traversal(Path(out_dir), input_path, model_uri, fd, volume, traversal, step_values,
                                   position, grid)
    log.info("%s sits at %+.2f SD along %s; wrote %d steps to %s", input_path.name, position, fd.direction.name,
             len(step_values), out_dir)
    return written
