"""The latent-direction experiment, family-agnostic: latents + ``decode``/``encode`` callables in, results out.

  probes.py      probe pipelines (latent, size-controlled, PCA-of-voxels and brain-volume baselines)
  evaluation.py  repeated nested CV, subject-bootstrap CIs, permutation p-values, held-out scores
  targets.py     labels (sex, age_old, age_group, planted) and covariates (size, brain-mask volume) from subjects.csv
  suite.py       every probe of one model -> table, fitted probes, directions
  headline.py    the directions stage's headline numbers, defined once
  direction.py   the ``Direction`` (unit raw-latent vector, SD step scale, JSON artifacts)
  sizeaxis.py    the model's own latent head-size axis: the tangent of a global rescaling of the volumes
  traversal.py   decode along a direction; voxel-wise group difference maps
  effects.py     measures, re-encoded probe output and predictions along traversals; monotonicity
  groundtruth.py agreement with planted effects (synthetic cohort, positive controls)
  counterfactual.py  composition, reversibility, effectiveness and minimality of every direction
  codec.py       LatentCodec: volumes <-> flat latents for any family (picks the latent space and inversion budget)
  lookup.py      the direction fitted for a model version (DVC output or its MLflow run)
  scan.py        traverse_scan: a user's scan along a fitted direction
  study.py       one direction's traversal, measures and checks in the directions stage
  experiment.py  the directions stage: encode -> probe -> direct -> traverse -> measure -> check -> record

Method and conventions: docs/directions_method.md.
"""

from .direction import Direction, direction_from_probe, raw_gradient
from .effects import Monotonicity, TraversalEffects, monotonicity, traversal_effects
from .evaluation import Estimate, ProbeResult, evaluate_probe
from .groundtruth import (PLANTED_AGE_SIGNS, effect_agreement, effect_maps, ground_truth_metrics, map_correlation,
                          partial_map_correlation)
from .probes import CovariateResidualizer, ProbeSettings, make_probe, probe_probability
from .suite import ProbeSuite, run_probe_suite
from .targets import TARGETS, Target, available_targets, brain_mask_volume, covariate, target_labels
from .traversal import DifferenceMap, decode_batched, group_difference_map, symmetric_steps, traverse

__all__ = [
    "TARGETS", "PLANTED_AGE_SIGNS", "CovariateResidualizer", "DifferenceMap", "Direction", "Estimate",
    "Monotonicity", "ProbeResult", "ProbeSettings", "ProbeSuite", "Target", "TraversalEffects",
    "available_targets", "brain_mask_volume", "covariate", "decode_batched", "direction_from_probe", "effect_agreement", "effect_maps",
    "evaluate_probe", "ground_truth_metrics", "group_difference_map", "make_probe", "map_correlation",
    "monotonicity", "partial_map_correlation", "probe_probability", "raw_gradient", "run_probe_suite",
    "symmetric_steps", "target_labels",
    "traversal_effects", "traverse",
]
