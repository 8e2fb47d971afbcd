"""Apply fitted directions to registered models: the latent codec, direction look-up, and `traverse_scan`.

``LatentCodec`` is the only place that knows how each family maps volumes to flat latent vectors:

  ae / vae   ``model.encode`` / ``model.decode`` (z, ``latent_dim``)
  gan        z by inversion (``GAN.encode(x, steps=...)``, Adam from z = 0), ``decode`` = EMA generator
  stylegan   W (``w_dim``) or W+ flattened (``n_layers * w_dim``) by inversion from ``w_avg``
             (``StyleGAN.project``); ``decode`` reshapes W+ back to ``(B, n_layers, w_dim)``

Everything else in ``brainlatent.directions`` sees arrays ``(N, D)`` and the codec's callables only.

``traverse_scan`` moves a user's scan along a direction fitted by the ``directions`` stage for the same
model version: the scan is preprocessed exactly like ``prepare`` (``preprocess_image`` with ``params.data``),
encoded, moved, decoded, and written as one NIfTI per step plus a PNG strip. Outputs sit in the scan's own
world space (the processing box centred on its brain), so they overlay the input in a viewer.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from brainlatent import registry, tracking
from brainlatent.config import Params
from brainlatent.data.preprocess import BadInputError, preprocess_image, read_brain, subject_grid
from brainlatent.grid import Grid
from brainlatent.models.base import LatentModel

from .direction import Direction
from .traversal import decode_batched, traverse

log = logging.getLogger(__name__)

INVERTING_FAMILIES: tuple[str, ...] = ("gan", "stylegan")
# Short names a user may type; the ordinal probe uses every age group, so it is "the" age direction.
DIRECTION_ALIASES: dict[str, str] = {"age": "age_group"}
DIRECTIONS_ARTIFACT_DIR = "directions"  # inside a directions run's artifacts and under directions/<family>/


# ------------------------------------------------------------------------------------------ the codec
@dataclass(frozen=True)
class LatentCodec:
    """A registered model's encoder and decoder on flat latent vectors ``(B, D)``, for any family.

    ``latent_space`` is ``"z"`` for ae/vae/gan and ``"w"`` / ``"w+"`` for StyleGAN. ``inversion_steps``
    (gan, stylegan) is the Adam budget of each encoding.
    """

    model: LatentModel
    latent_space: str
    inversion_steps: int

    @classmethod
    def for_model(cls, model: LatentModel, stylegan_space: str = "w", inversion_steps: int = 100) -> "LatentCodec":
        if stylegan_space not in ("w", "w+"):
            raise ValueError(f"directions.latent_space: expected 'w' or 'w+', got {stylegan_space!r}")
        space = stylegan_space if model.family == "stylegan" else "z"
        return cls(model, space, int(inversion_steps))

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def inverts(self) -> bool:
        """Encoding is an optimisation (GAN families): costly, and only approximately a preimage."""
        return self.family in INVERTING_FAMILIES

    @property
    def dim(self) -> int:
        """D, the size of the flat latent vectors the directions live in."""
        layers = self.model.n_layers if self.latent_space == "w+" else 1
        return int(self.model.latent_dim) * int(layers)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def describe(self) -> str:
        return f"{self.family} {self.latent_space} ({self.dim} dimensions)"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes ``(B, 1, X, Y, Z)`` in [0, 1] -> latents ``(B, D)`` float32 on the model's device."""
        self.model.check_volumes(x)
        x = x.to(self.device, torch.float32)
        if not self.inverts:
            with torch.inference_mode():
                return self.model.encode(x).reshape(len(x), -1)
        # Inversion needs autograd; callers may hold inference mode (effects.apply_batched does), which
        # enable_grad cannot lift. Leave it locally and copy the input out of inference-tensor storage.
        with torch.inference_mode(False):
            x = x.clone()
            if self.family == "stylegan":
                z = self.model.project(x, self.latent_space, steps=self.inversion_steps, compute_ssim=False).latent
            else:
                z = self.model.encode(x, steps=self.inversion_steps, compute_ssim=False)
        return z.detach().reshape(len(x), -1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, D)`` -> volumes ``(B, 1, X, Y, Z)`` in [0, 1]."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"{self.describe()}: expected latents (B, {self.dim}), got {tuple(z.shape)}")
        z = z.to(self.device, torch.float32)
        if self.latent_space == "w+":
            z = z.reshape(len(z), self.model.n_layers, self.model.latent_dim)
        return self.model.decode(z)

    def encode_volumes(self, volumes: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(N, X, Y, Z)`` volumes (any float dtype, a memmap is fine) -> ``(N, D)`` float64 latents.

        Batched: an inversion batch costs about as much per volume as single volumes on a CPU, and far less
        on a GPU; each volume's inversion is independent of the others in its batch (brainlatent.inversion).
        """
        if volumes.ndim != 4:
            raise ValueError(f"volumes: expected (N, X, Y, Z), got shape {volumes.shape}")
        out = []
        for start in range(0, len(volumes), batch_size):
            batch = torch.from_numpy(np.asarray(volumes[start : start + batch_size], np.float32)[:, None])
            out.append(self.encode(batch).float().cpu().numpy())
        latents = np.concatenate(out).astype(np.float64)
        if not np.all(np.isfinite(latents)):
            raise ValueError(f"{self.describe()}: encoding produced NaN/Inf latents (diverged inversion?)")
        return latents

    def decode_latents(self, latents: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """``(N, D)`` -> ``(N, X, Y, Z)`` float32 volumes."""
        return decode_batched(latents, self.decode, batch_size=batch_size, device=self.device)


# --------------------------------------------------------------------------------------- look-ups
def directions_dir(root: Path, family: str) -> Path:
    """Where the ``directions`` stage writes a family's direction JSONs (DVC output)."""
    return Path(root) / "directions" / family / DIRECTIONS_ARTIFACT_DIR


def _fitted_for(direction: Direction, loaded: registry.LoadedModel) -> bool:
    meta = direction.metadata
    return meta.get("model_name") == loaded.name and str(meta.get("model_version")) == str(loaded.version)


def _latest_directions_run(loaded: registry.LoadedModel) -> str | None:
    """The newest finished ``brainlatent-directions`` run of exactly this model version, if any."""
    exp = mlflow.get_experiment_by_name(tracking.DIRECTIONS_EXPERIMENT)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.model_name = '{loaded.name}' and tags.model_version = '{loaded.version}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _run_direction_names(run_id: str) -> list[str]:
    files = MlflowClient().list_artifacts(run_id, DIRECTIONS_ARTIFACT_DIR)
    return sorted(Path(f.path).name.removesuffix(".json") for f in files if f.path.endswith(".json"))


def load_direction(name: str, loaded: registry.LoadedModel, root: Path) -> Direction:
    """The direction ``name`` fitted for ``loaded``'s exact model version.

    ``name``: a direction name (``sex``, ``age_old``, ``age_group``, ``sex_size_controlled``; alias ``age``)
    or the path of a direction JSON. Looks in ``directions/<family>/directions/`` first (the DVC output,
    used only when it was fitted on this version), then in the newest finished directions run of this version.
    """
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"direction file not found: {path}")
        direction = Direction.load(path)
        if not _fitted_for(direction, loaded):  # the user chose this file: allowed, but say so
            log.warning("%s was fitted for %s version %s, not %s version %s", path,
                        direction.metadata.get("model_name", "?"), direction.metadata.get("model_version", "?"),
                        loaded.name, loaded.version)
        return direction
    name = DIRECTION_ALIASES.get(name, name)
    family = loaded.model.family
    local_dir = directions_dir(root, family)
    local = {p.stem: Direction.load(p) for p in sorted(local_dir.glob("*.json"))} if local_dir.is_dir() else {}
    current = {n: d for n, d in local.items() if _fitted_for(d, loaded)}
    if name in current:
        return current[name]

    run_id = _latest_directions_run(loaded)
    in_run = _run_direction_names(run_id) if run_id else []
    if name in in_run:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{DIRECTIONS_ARTIFACT_DIR}/{name}.json", dst_path=tmp)
            return Direction.load(path)

    what = f"{loaded.name} version {loaded.version}"
    available = sorted(set(current) | set(in_run))
    if available:
        raise ValueError(f"unknown direction {name!r} for {what}; available: {available} "
                         f"(aliases: {DIRECTION_ALIASES})")
    if local:
        other = next(iter(local.values())).metadata
        raise ValueError(
            f"the directions in {local_dir} were fitted for {other.get('model_name', '?')} version "
            f"{other.get('model_version', '?')}, not {what}, and no directions run of {what} exists: run "
            f"`brainlatent directions --model {family} --model-uri models:/{loaded.name}/{loaded.version}`"
        )
    raise ValueError(f"no directions fitted for {what}: run `brainlatent directions --model {family}` first")


# ------------------------------------------------------------------------------------ traverse a scan
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
        direction: a direction name (see :func:`load_direction`) or a direction JSON file.
        steps: positions along the direction in SDs of the cohort's projection (e.g. ``-2 -1 0 1 2``),
            relative to the scan's own latent.
        out_dir: created if needed.

    Writes ``<direction>_step<k>_<step>sd.nii.gz`` (one per step, float32 in [0, 1]), ``input.nii.gz`` (the
    preprocessed scan), ``<direction>_strip.png`` and ``traversal.json`` (provenance and where the scan sits
    along the direction). Returns the written paths in that order.
    """
    from brainlatent.train.device import resolve_device
    from brainlatent.viz.montage import save_nifti
    from brainlatent.viz.traversal import save_traversal_strip

    root = (root or tracking.project_root()).resolve()
    input_path = Path(input_path)
    step_values = _steps(steps)
    if not input_path.is_file():
        raise ValueError(f"input scan not found: {input_path}")
    tracking.configure(root)
    loaded = registry.load_model(model_uri, resolve_device(params.device))  # names a bad URI / alias
    model = loaded.model
    d = params.data
    if tuple(model.volume_shape) != tuple(d.shape):
        raise ValueError(f"model {model_uri} expects volumes of shape {tuple(model.volume_shape)}, but params "
                         f"data.shape is {tuple(d.shape)}: use the params the model was trained with")
    fitted = load_direction(direction, loaded, root)
    # Encode the scan as the cohort was encoded when the direction was fitted (same space, same inversion
    # budget): its centre and SD step are statistics of those latents.
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

    try:
        volume, qc = preprocess_image(input_path, d.shape, d.fov_mm, d.intensity_percentiles, d.fit_bbox)
    except BadInputError as err:
        raise ValueError(f"{input_path}: cannot preprocess this scan like `prepare` does: {err}") from None
    if qc.fov_overflow_mm > 0 and not d.fit_bbox:
        log.warning("%s: brain extends %.1f mm beyond data.fov_mm %s (cut off)", input_path, qc.fov_overflow_mm,
                    list(d.fov_mm))
    grid = _scan_grid(input_path, params, qc.center_mm)

    volume = volume.astype(np.float32)
    latent = codec.encode_volumes(volume[None])  # (1, D)
    traversal = traverse(latent, fitted, step_values, codec.decode, device=codec.device)[0]  # (K, X, Y, Z)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        save_nifti(vol, grid.affine, out / f"{fitted.name}_step{k:02d}_{s:+.2f}sd.nii.gz")
        for k, (vol, s) in enumerate(zip(traversal, step_values))
    ]
    written.append(save_nifti(volume, grid.affine, out / "input.nii.gz"))
    title = f"{input_path.name}: {fitted.name} (+ = {fitted.positive}), {loaded.name} v{loaded.version}"
    written.append(save_traversal_strip(traversal, step_values, out / f"{fitted.name}_strip.png",
                                        title=title, voxel_mm=grid.voxel_mm))
    position = float(fitted.project(latent)[0])
    info = {
        "input": str(input_path), "model_uri": model_uri, "model_name": loaded.name,
        "model_version": str(loaded.version), "direction": fitted.name, "positive": fitted.positive,
        "latent_space": codec.latent_space, "inversion_steps": codec.inversion_steps if codec.inverts else None,
        "steps_sd": step_values.tolist(), "scan_position_sd": position,
        "files": [p.name for p in written],
    }
    (out / "traversal.json").write_text(json.dumps(info, indent=2))
    written.append(out / "traversal.json")
    log.info("%s sits at %+.2f SD along %s; wrote %d steps to %s", input_path.name, position, fitted.name,
             len(step_values), out)
    return written
