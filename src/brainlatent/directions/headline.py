"""The directions stage's headline numbers (``metrics/directions/<family>.json``), defined once.

:data:`HEADLINE` names every headline key that is not generated per target, where a ground-truth key is copied
from, and which keys are also written as model-version tags (``directions.<key>``, shown by a registry
look-up). :func:`headline_metrics` builds the flat headline dict from the probe suite, the direction studies and
the ground-truth checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .evaluation import ProbeResult
from .groundtruth import MAP_MEASURE_SUFFIXES
from .suite import ProbeSuite
from .targets import TARGETS

if TYPE_CHECKING:
    from .study import DirectionStudy

AGE_DIRECTIONS = ("age_group", "age_old")
PROBE_BASELINES = ("pca_voxels", "pca_reconstructions", "brain_mask_volume")


@dataclass(frozen=True)
class HeadlineKey:
    name: str
    ground_truth: str | None = None  # the detailed ``gt.*`` key it is copied from (None: computed here)
    version_tag: bool = False  # also a model-version tag ``directions.<name>``


HEADLINE: tuple[HeadlineKey, ...] = (
    HeadlineKey("sex_auc", version_tag=True),
    HeadlineKey("sex_size_controlled_auc", version_tag=True),
    HeadlineKey("age_old_auc", version_tag=True),
    HeadlineKey("age_group_spearman", version_tag=True),
    HeadlineKey("sex_brain_mask_volume_auc", version_tag=True),
    HeadlineKey("planted_auc", version_tag=True),
    HeadlineKey("age_map_r", "gt.age_group.age_map_r", version_tag=True),
    HeadlineKey("age_old_map_r", "gt.age_old.age_map_r"),
    HeadlineKey("sex_map_r", "gt.sex.sex_map_r", version_tag=True),
    HeadlineKey("sex_local_map_r_raw", "gt.sex.sex_local_map_r", version_tag=True),
    HeadlineKey("sex_local_map_r_size_controlled", "gt.sex_size_controlled.sex_local_map_r", version_tag=True),
    HeadlineKey("sex_local_size_controlled_better", "gt.sex_local.size_controlled_better"),
    HeadlineKey("planted_map_r", "gt.planted.planted_map_r", version_tag=True),
    HeadlineKey("planted_map_r_size_controlled", "gt.planted_size_controlled.planted_map_r"),
    HeadlineKey("planted_size_controlled_better", "gt.planted.size_controlled_better"),
    # The same comparisons beyond global size: partial r given the map of a pure global rescaling
    # (experiment.ground_truth_checks), and that map's own plain r with the local map.
    HeadlineKey("sex_local_map_r_beyond_size_raw", "gt.sex.sex_local_map_r_beyond_size"),
    HeadlineKey("sex_local_map_r_beyond_size_size_controlled", "gt.sex_size_controlled.sex_local_map_r_beyond_size"),
    HeadlineKey("sex_local_size_controlled_better_beyond_size", "gt.sex_local.size_controlled_better_beyond_size"),
    HeadlineKey("sex_local_map_r_global_size", "gt.global_size.sex_local_map_r"),
    HeadlineKey("planted_map_r_beyond_size", "gt.planted.planted_map_r_beyond_size"),
    HeadlineKey("planted_map_r_beyond_size_size_controlled",
                "gt.planted_size_controlled.planted_map_r_beyond_size"),
    HeadlineKey("planted_size_controlled_better_beyond_size", "gt.planted.size_controlled_better_beyond_size"),
    HeadlineKey("planted_map_r_global_size", "gt.global_size.planted_map_r"),
    # The global size a direction moves beyond the local effect (partial r with the rescaling map given the
    # local map): the beyond-size r cannot see it, since `local + a x size` scores the same whatever `a`.
    HeadlineKey("sex_global_size_r_beyond_local_raw", "gt.sex.global_size_map_r_beyond_sex_local"),
    HeadlineKey("sex_global_size_r_beyond_local_size_controlled",
                "gt.sex_size_controlled.global_size_map_r_beyond_sex_local"),
    HeadlineKey("sex_local_size_controlled_less_size", "gt.sex_local.size_controlled_less_size"),
    HeadlineKey("planted_global_size_r_beyond_local", "gt.planted.global_size_map_r_beyond_planted"),
    HeadlineKey("planted_global_size_r_beyond_local_size_controlled",
                "gt.planted_size_controlled.global_size_map_r_beyond_planted"),
    HeadlineKey("planted_size_controlled_less_size", "gt.planted.size_controlled_less_size"),
    # Size-free r: the direction's whole map against the part of the planted map a global rescaling does not
    # explain; unlike the beyond-size r it counts the global size a direction moves against it.
    HeadlineKey("sex_local_map_r_size_free_raw", "gt.sex.sex_local_map_r_size_free"),
    HeadlineKey("sex_local_map_r_size_free_size_controlled", "gt.sex_size_controlled.sex_local_map_r_size_free"),
    HeadlineKey("sex_local_size_controlled_better_size_free", "gt.sex_local.size_controlled_better_size_free"),
    HeadlineKey("planted_map_r_size_free", "gt.planted.planted_map_r_size_free"),
    HeadlineKey("planted_map_r_size_free_size_controlled", "gt.planted_size_controlled.planted_map_r_size_free"),
    HeadlineKey("planted_size_controlled_better_size_free", "gt.planted.size_controlled_better_size_free"),
    # size-controlled minus raw by each measure, and with directions.map_bootstrap its refit interval and the
    # share of refits with size control ahead (refit.py)
    *(HeadlineKey(f"{stem}_size_controlled_minus_raw_r{suffix}{end}",
                  f"gt.{key}.size_controlled_minus_raw_r{suffix}{end}")
      for stem, key in (("sex_local", "sex_local"), ("planted", "planted"))
      for suffix in MAP_MEASURE_SUFFIXES for end in ("", "_low", "_high")),
    *(HeadlineKey(f"{stem}_size_controlled_better{suffix}_share", f"gt.{key}.size_controlled_better{suffix}_share")
      for stem, key in (("sex_local", "sex_local"), ("planted", "planted"))
      for suffix in MAP_MEASURE_SUFFIXES),
    HeadlineKey("age_ventricle_sign_correct", "gt.age_group.ventricle_volume_mm3.sign_correct"),
    HeadlineKey("age_ventricle_monotonicity", version_tag=True),
    HeadlineKey("encode_psnr_db", version_tag=True),
)
VERSION_TAG_KEYS: tuple[str, ...] = tuple(k.name for k in HEADLINE if k.version_tag)
GROUND_TRUTH_HEADLINE: dict[str, str] = {k.name: k.ground_truth for k in HEADLINE if k.ground_truth}


def _probe_metric(results: dict[tuple[str, str], ProbeResult], target: str, features: str, metric: str,
                  split: str) -> dict[str, float]:
    r = results.get((target, features))
    if r is None:
        return {}
    est = (r.heldout if split == "heldout" and r.heldout else r.cv).get(metric)
    return {} if est is None else {"": est.value, "_low": est.low, "_high": est.high}


def probe_headline(suite: ProbeSuite, split: str) -> dict[str, float]:
    """``<target>_auc`` (held out when ``split == "heldout"``, else CV) with its interval, the CV estimate and
    p-value beside it, the baselines' AUCs and the size-controlled probes; ``age_group_spearman``."""
    results = {(r.target, r.features): r for r in suite.results}
    out: dict[str, float] = {}

    def probe(prefix: str, target: str, features: str, metric: str = "auc") -> None:
        out.update({f"{prefix}{s}": v for s, v in _probe_metric(results, target, features, metric, split).items()})
        cv = _probe_metric(results, target, features, metric, "cv")
        if cv:
            stem = prefix.removesuffix("_" + metric)
            out.update({f"{stem}_cv_{metric}{s}": v for s, v in cv.items()})
            out[f"{stem}_p_value"] = results[(target, features)].p_value

    for target in TARGETS:
        probe(f"{target}_auc", target, "latent")
        for baseline in PROBE_BASELINES:
            value = _probe_metric(results, target, baseline, "auc", split)
            if value:
                out[f"{target}_{baseline}_auc"] = value[""]
        probe(f"{target}_size_controlled_auc", target, "latent_size_controlled")
    probe("age_group_spearman", "age_group", "latent", "spearman")
    return out


def study_headline(studies: dict[str, DirectionStudy]) -> dict[str, float]:
    """Along every direction: probe and brain-volume change, ventricles along the age directions, and the
    counterfactual checks (``cf_<direction>_<check>``)."""
    out: dict[str, float] = {}
    for name, study in studies.items():
        summary = study.effects.summary
        out[f"{name}_probe_monotonicity"] = float(summary.loc["probe_output", "mean_spearman"])
        out[f"{name}_brain_volume_relative_change"] = float(summary.loc["brain_volume_mm3", "relative_change"])
        if name in AGE_DIRECTIONS:
            out[f"{name}_ventricle_monotonicity"] = float(summary.loc["ventricle_volume_mm3", "mean_spearman"])
            out[f"{name}_ventricle_relative_change"] = float(summary.loc["ventricle_volume_mm3", "relative_change"])
        for check, value in study.counterfactual.items():
            if isinstance(value, float) and "." not in check and check != "composition_cycle_mae":
                out[f"cf_{name}_{check}"] = value
    if "age_group_ventricle_monotonicity" in out:
        out["age_ventricle_monotonicity"] = out["age_group_ventricle_monotonicity"]
    return out


def headline_metrics(suite: ProbeSuite, studies: dict[str, DirectionStudy], gt: dict[str, float],
                     split: str) -> dict[str, float]:
    """The flat headline numbers: held-out (test split) probe scores when there is a test split, else CV;
    CV scores with their corrected-t intervals and permutation p-values beside them; effects along the
    traversals; counterfactual checks (``cf_<direction>_<check>``); ground truth (:data:`HEADLINE`)."""
    out = {**probe_headline(suite, split), **study_headline(studies)}
    out.update({key: gt[source] for key, source in GROUND_TRUTH_HEADLINE.items() if source in gt})
    return out
