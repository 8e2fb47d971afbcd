"""Counterfactual checks of a latent direction: is a traversal a sound counterfactual of the scan?

Monteiro, Ribeiro, Pawlowski, Castro, Glocker ("Measuring axiomatic soundness of counterfactual image models",
ICLR 2023) ask three things of a counterfactual model, which we test on every direction's traversals, and we
add the minimality their paper discusses where a ground truth exists:

  composition    the null intervention leaves a scan unchanged. ``f = decode . encode``:
                 ``composition_mae`` = mean |f(x) - x| (how much of the scan the latent holds; per model),
                 ``composition_cycle_mae`` = mean |f(f(x)) - f(x)| (applying it again changes nothing more),
                 and per direction ``zero_step_max`` = max |decode(z + 0 d) - decode(z)| (a zero step is the
                 reconstruction itself: a decoder with random noise or dropout fails it).
  reversibility  +d then -d returns to the scan: ``x_k = decode(z + s_k d)``, ``x_k' = decode(encode(x_k) - s_k d)``;
                 ``reversibility_mae`` = mean |x_k' - decode(z)| over the non-zero steps, and
                 ``reversibility_ratio`` = that / mean |x_k - decode(z)| (0: the step is undone exactly; 1: the
                 round trip lands as far from the scan as the counterfactual itself).
  effectiveness  an independent predictor moves the intended way, monotonically: the signed mean Spearman
                 correlation of the predictor with the step (+1: rises strictly with every step for every
                 subject; -1: falls). Predictors (never the direction's own probe): the projection of the volume
                 on the planted effect map, the feature network's prediction of the label, a measured volume
                 (``EFFECTIVENESS``).
  minimality     where a planted effect map exists: the share of the change energy (sum over subjects of
                 ``(x_last - x_first)^2``) that lies outside the planted region (the smallest set of voxels holding
                 ``REGION_ENERGY`` of the planted map's energy), beside ``minimality_chance``, the share of brain
                 voxels outside that region (what a change spread evenly over the brain would give).

All distances are mean absolute voxel differences inside ``mask`` (the brain), in processed intensity units.
Everything here sees arrays and callables only, never a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .direction import Direction
from .effects import Measure, TraversalEffects
from .traversal import Decode, decode_batched

REGION_ENERGY = 0.9  # the planted region: the voxels holding 90% of the planted map's squared amplitude


@dataclass(frozen=True)
class Predictor:
    """An independent read-out whose rise along a direction says the direction did what it should."""

    quantity: str  # a column of the traversal effects table
    sign: int  # +1: must rise along +direction; -1: must fall


# For each direction target, the independent predictors in order of preference (the first one present is the
# headline ``effectiveness``; every one present is logged). Map projections exist where a planted map does
# (synthetic cohorts, positive controls); the feature network's predictions where it is registered; the
# measured volumes always. Males have larger brains on average (in real data too), and the lateral
# ventricles grow with age.
EFFECTIVENESS: dict[str, tuple[Predictor, ...]] = {
    "sex": (Predictor("sex_map_projection", +1), Predictor("predicted_male", +1),
            Predictor("brain_volume_mm3", +1)),
    "sex_size_controlled": (Predictor("sex_local_map_projection", +1), Predictor("predicted_male", +1)),
    "age_old": (Predictor("age_map_projection", +1), Predictor("predicted_age_group", +1),
                Predictor("ventricle_volume_mm3", +1)),
    "age_group": (Predictor("age_map_projection", +1), Predictor("predicted_age_group", +1),
                  Predictor("ventricle_volume_mm3", +1)),
    "planted": (Predictor("planted_map_projection", +1),),
    "planted_size_controlled": (Predictor("planted_map_projection", +1),),
}
# The planted map each direction should reproduce (minimality), by the key of the ground-truth maps.
INTENDED_MAP: dict[str, str] = {
    "sex": "sex", "sex_size_controlled": "sex_local", "age_old": "age", "age_group": "age",
    "planted": "planted", "planted_size_controlled": "planted",
}


# ------------------------------------------------------------------------------------------ measures
def map_projection_measure(maps: dict[str, np.ndarray], mask: np.ndarray | None = None) -> Measure:
    """A measure ``(N, X, Y, Z) -> DataFrame`` with one column ``<key>_map_projection`` per planted map: the
    inner product of each volume with the map inside ``mask``. It rises along a traversal exactly as far as
    the traversal moves the volume along the planted effect."""
    if not maps:
        raise ValueError("map_projection_measure: no maps given")
    shape = next(iter(maps.values())).shape
    mask = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    weights = {}
    for key, planted in maps.items():
        if planted.shape != mask.shape:
            raise ValueError(f"map_projection_measure: map {key!r} has shape {planted.shape}, mask {mask.shape}")
        weights[f"{key}_map_projection"] = np.where(mask, planted, 0.0).astype(np.float64).ravel()

    def measure(volumes: np.ndarray) -> pd.DataFrame:
        flat = np.asarray(volumes, np.float64).reshape(len(volumes), -1)
        return pd.DataFrame({name: flat @ w for name, w in weights.items()})

    return measure


def featurenet_measure(net: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 16) -> Measure:
    """A measure with the feature network's ``predicted_male`` (P(male)) and ``predicted_age_group`` (the
    expected age-group index under its softmax, a continuous ordinal score) of each volume ``(N, X, Y, Z)``.

    ``net(x (B, 1, X, Y, Z)) -> (sex logit (B,), age logits (B, G))`` (models/featurenet.FeatureNet)."""

    @torch.inference_mode()
    def measure(volumes: np.ndarray) -> pd.DataFrame:
        net.eval()
        male, age = [], []
        for start in range(0, len(volumes), batch_size):
            x = torch.from_numpy(np.asarray(volumes[start : start + batch_size], np.float32)[:, None]).to(device)
            sex_logit, age_logits = net(x)
            male.append(torch.sigmoid(sex_logit).double().cpu().numpy())
            probs = torch.softmax(age_logits.double(), dim=1).cpu().numpy()
            age.append(probs @ np.arange(probs.shape[1], dtype=np.float64))
        return pd.DataFrame({"predicted_male": np.concatenate(male), "predicted_age_group": np.concatenate(age)})

    return measure


def combine_measures(*measures: Measure) -> Measure:
    """One measure whose columns are those of every given measure, side by side."""

    def measure(volumes: np.ndarray) -> pd.DataFrame:
        return pd.concat([m(volumes).reset_index(drop=True) for m in measures], axis=1)

    return measure


# ------------------------------------------------------------------------------------------- checks
def _mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean |a - b| over the last three axes (inside ``mask``) -> shape ``a.shape[:-3]``."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is None:
        return diff.mean(axis=(-3, -2, -1))
    return diff[..., np.asarray(mask, bool)].mean(-1)


def composition(volumes: np.ndarray, reconstructions: np.ndarray, cycled: np.ndarray | None = None,
                mask: np.ndarray | None = None) -> dict[str, float]:
    """Null-intervention checks on scans ``volumes (S, X, Y, Z)``: ``reconstructions`` = f(x) ``(S, ...)``,
    ``cycled`` = f(f(x)) for the first ``len(cycled)`` scans (None: not measured)."""
    out = {"composition_mae": float(_mae(reconstructions, volumes, mask).mean())}
    if cycled is not None and len(cycled):
        out["composition_cycle_mae"] = float(_mae(cycled, reconstructions[: len(cycled)], mask).mean())
    return out


def zero_step_error(latents: np.ndarray, direction: Direction, decode: Decode, reconstructions: np.ndarray,
                    batch_size: int = 8, device: str | torch.device = "cpu") -> float:
    """max |decode(z + 0 * d) - decode(z)| over subjects and voxels: 0 for a deterministic decoder."""
    zero = direction.check_latents(latents) + direction.offsets(np.zeros(1))[0]
    moved = decode_batched(zero, decode, batch_size, device)
    return float(np.abs(moved.astype(np.float64) - reconstructions).max())


def reversibility(reencoded: np.ndarray, traversals: np.ndarray, steps: np.ndarray, direction: Direction,
                  decode: Decode, reconstructions: np.ndarray, mask: np.ndarray | None = None,
                  batch_size: int = 8, device: str | torch.device = "cpu") -> dict[str, float]:
    """+d then -d: ``reencoded (S, K, L)`` latents of ``traversals (S, K, X, Y, Z)`` along ``steps (K,)`` are
    moved back by each step and decoded; compared with ``reconstructions (S, X, Y, Z)`` = decode(z).

    Returns ``reversibility_mae`` and ``reversibility_ratio`` over the non-zero steps (module docstring), and
    ``composition_cycle_mae`` from the zero step when there is one (its round trip is f(f(x)) vs f(x))."""
    s, k = traversals.shape[:2]
    steps = np.asarray(steps, np.float64)
    if reencoded.shape[:2] != (s, k) or reconstructions.shape[0] != s:
        raise ValueError(f"reversibility: expected reencoded ({s}, {k}, L) and {s} reconstructions, got "
                         f"{reencoded.shape} and {reconstructions.shape}")
    back = reencoded - direction.offsets(steps)[None]  # (S, K, L)
    returned = decode_batched(back.reshape(s * k, -1), decode, batch_size, device).reshape(traversals.shape)
    residual = _mae(returned, reconstructions[:, None], mask)  # (S, K)
    moved = _mae(traversals, reconstructions[:, None], mask)  # (S, K): how far each counterfactual went
    out: dict[str, float] = {}
    nonzero = steps != 0
    if nonzero.any():
        out["reversibility_mae"] = float(residual[:, nonzero].mean())
        with np.errstate(invalid="ignore", divide="ignore"):
            out["reversibility_ratio"] = float(residual[:, nonzero].mean() / moved[:, nonzero].mean())
    if (~nonzero).any():
        out["composition_cycle_mae"] = float(residual[:, ~nonzero].mean())
    return out


def effectiveness(summary: pd.DataFrame, predictors: tuple[Predictor, ...]) -> dict[str, float | str]:
    """Signed monotonicity of each predictor present in ``summary`` (``TraversalEffects.summary``):
    ``effectiveness.<quantity>`` (+1: every subject's predictor moves strictly the intended way) and
    ``effectiveness.<quantity>.change_per_sd``; ``effectiveness`` / ``effectiveness_predictor`` for the first
    one present. Empty when none is."""
    out: dict[str, float | str] = {}
    for p in predictors:
        if p.quantity not in summary.index:
            continue
        row = summary.loc[p.quantity]
        signed = float(row["mean_spearman"]) * p.sign
        out[f"effectiveness.{p.quantity}"] = signed
        out[f"effectiveness.{p.quantity}.change_per_sd"] = float(row["change_per_sd"])
        if "effectiveness" not in out:
            out["effectiveness"], out["effectiveness_predictor"] = signed, p.quantity
    return out


def planted_region(planted: np.ndarray, mask: np.ndarray | None = None, energy: float = REGION_ENERGY) -> np.ndarray:
    """Boolean ``(X, Y, Z)``: the fewest voxels (inside ``mask``) holding ``energy`` of ``sum(planted^2)``, and any
    voxel as strong as the weakest of them."""
    if not 0 < energy <= 1:
        raise ValueError(f"planted_region: energy must be in (0, 1], got {energy}")
    planted = np.asarray(planted, np.float64)
    mask = np.ones(planted.shape, bool) if mask is None else np.asarray(mask, bool)
    power = np.where(mask, planted**2, 0.0).ravel()
    total = power.sum()
    if not total > 0:
        raise ValueError("planted_region: the planted map is zero inside the mask")
    ranked = np.sort(power)[::-1]
    n = min(int(np.searchsorted(np.cumsum(ranked), energy * total * (1 - 1e-12))) + 1, ranked.size)
    # Voxels tied with the last one taken are in too: a flat map's region is the whole flat area.
    return ((power >= ranked[n - 1]) & (power > 0)).reshape(planted.shape)


def minimality(traversals: np.ndarray, planted: np.ndarray, mask: np.ndarray | None = None,
               energy: float = REGION_ENERGY) -> dict[str, float]:
    """Share of the traversals' change energy ``sum_s (x[s, -1] - x[s, 0])^2`` outside the planted region,
    and the share of mask voxels outside it (chance). ``traversals (S, K, X, Y, Z)``, ``planted (X, Y, Z)``."""
    traversals = np.asarray(traversals)
    change = ((traversals[:, -1].astype(np.float64) - traversals[:, 0]) ** 2).sum(0)
    mask = np.ones(change.shape, bool) if mask is None else np.asarray(mask, bool)
    if planted.shape != change.shape:
        raise ValueError(f"minimality: planted map {planted.shape} does not match the volumes {change.shape}")
    region = planted_region(planted, mask, energy)
    total = change[mask].sum()
    outside = mask & ~region
    return {
        "minimality_outside_share": float(change[outside].sum() / total) if total > 0 else float("nan"),
        "minimality_chance": float(outside.sum() / mask.sum()),
    }


@dataclass(frozen=True)
class CounterfactualInputs:
    """What the checks of one direction need (arrays from the directions stage)."""

    direction: Direction
    latents: np.ndarray  # (S, L) the traversed subjects' latents
    traversals: np.ndarray  # (S, K, X, Y, Z)
    steps: np.ndarray  # (K,)
    reconstructions: np.ndarray  # (S, X, Y, Z) decode(latents)
    reencoded: np.ndarray | None  # (R, K, L) latents of the first R subjects' traversals, R <= S
    effects: TraversalEffects


def direction_checks(inputs: CounterfactualInputs, decode: Decode, mask: np.ndarray | None,
                     planted: np.ndarray | None, predictors: tuple[Predictor, ...] = (),
                     batch_size: int = 8, device: str | torch.device = "cpu") -> dict[str, float | str]:
    """Every check of one direction (module docstring): ``zero_step_max``, ``reversibility_*``,
    ``composition_cycle_mae`` (when re-encoded latents are given), ``effectiveness*`` (``predictors`` present
    in the effects), ``minimality_*`` (when ``planted`` is given)."""
    d = inputs.direction
    out: dict[str, float | str] = {
        "zero_step_max": zero_step_error(inputs.latents, d, decode, inputs.reconstructions, batch_size, device)}
    if inputs.reencoded is not None and len(inputs.reencoded):
        n = len(inputs.reencoded)
        out.update(reversibility(inputs.reencoded, inputs.traversals[:n], inputs.steps, d, decode,
                                 inputs.reconstructions[:n], mask, batch_size, device))
    out.update(effectiveness(inputs.effects.summary, predictors))
    if planted is not None:
        out.update(minimality(inputs.traversals, planted, mask))
    return out

