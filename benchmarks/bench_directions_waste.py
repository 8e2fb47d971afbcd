"""Directions: wasted work removed (issue 19), before vs after in one process (BENCHMARKS.md).

1. ``run_probe_suite`` of an older revision (``--before``, its directions modules copied aside) vs the working
   tree, alternating, on a synthetic latent cohort: each latent probe fitted once instead of twice.
2. ``load_ground_truth`` on planted maps written onto the cohort grid (before: resampled again) vs onto
   ``effect_map_grid`` (after: read as written).

    python benchmarks/bench_directions_waste.py --before f647cc3~1 [--n 120] [--protocol fast|wide]
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from brainlatent.anatomy import load_template
from brainlatent.data.cohort import AGE_GROUPS
from brainlatent.data.preprocess import _write_effect_map, effect_map_grid
from brainlatent.directions.experiment import GROUND_TRUTH_MAPS, load_ground_truth
from brainlatent.directions.probes import ProbeSettings
from brainlatent.grid import Grid

MODULES = ("suite", "evaluation", "probes", "direction", "metrics", "targets")


def old_suite(rev: str, where: Path):
    """``run_probe_suite`` as of ``rev``: its directions modules copied into a package of their own."""
    pkg = where / "old_directions"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in MODULES:
        src = subprocess.run(["git", "show", f"{rev}:src/brainlatent/directions/{name}.py"], capture_output=True,
                             text=True, check=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("from ..", "from brainlatent."))
    sys.path.insert(0, str(where))
    import old_directions.suite

    return old_directions.suite.run_probe_suite


def cohort(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sex, grp = rng.integers(0, 2, n), rng.integers(0, 4, n)
    z = rng.normal(size=(n, d))
    z[:, 0] += sex
    z[:, 1] += 0.5 * grp
    etiv = 1.4e6 + 1e5 * sex + rng.normal(0, 5e4, n)
    subjects = pd.DataFrame({"subject_id": [str(i) for i in range(n)], "sex": np.where(sex, "M", "F"),
                             "age_group": [AGE_GROUPS[g] for g in grp], "age": 24.0 + 4 * grp,
                             "etiv_mm3": etiv, "brain_mask_volume_mm3": etiv * 0.8})
    return z, subjects


def bench_probes(before, n: int, protocol: str) -> None:
    from brainlatent.directions.suite import run_probe_suite as after

    settings = (ProbeSettings(n_splits=2, n_repeats=1, n_bootstrap=50, n_permutations=3, seed=0) if protocol == "fast"
                else ProbeSettings(n_splits=5, n_repeats=2, n_bootstrap=200, n_permutations=5, seed=0))
    z, s = cohort(n, 32)
    zt, st = cohort(40, 32, seed=1)
    kw = dict(test_latents=zt, test_subjects=st, baselines=False, size_control_targets=("sex",))
    times = {"before": [], "after": []}
    for _ in range(3):
        tables = {}
        for name, fn in (("before", before), ("after", after)):
            t = time.perf_counter()
            tables[name] = fn(z, s, settings, **kw).table()
            times[name].append(time.perf_counter() - t)
        pd.testing.assert_frame_equal(tables["before"], tables["after"])
    b, a = np.median(times["before"]), np.median(times["after"])
    print(f"run_probe_suite, {n} fit + 40 held-out subjects, 32 latents, 4 latent probes, {settings.n_splits}x"
          f"{settings.n_repeats} CV + {settings.n_permutations} permutations: before {b:.2f} s, after {a:.2f} s "
          f"(median of 3), after/before {a / b:.3f}; tables identical")


def bench_ground_truth() -> None:
    load_template()  # cached; both sides need it
    for shape in ((24, 32, 24), (64, 80, 64)):
        grid = Grid.box(shape, (176.0, 224.0, 176.0), (1.5, -17.0, 19.0))  # a cohort centre off the template's
        tmp = Path(tempfile.mkdtemp())
        src = tmp / "src"
        src.mkdir()
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = (-90, -126, -72)
        rng = np.random.default_rng(0)
        for f in GROUND_TRUTH_MAPS.values():
            nib.save(nib.Nifti1Image(rng.normal(size=(91, 109, 91)).astype(np.float32), affine), src / f)
        res = {}
        for name, target in (("before", grid), ("after", effect_map_grid(grid))):
            out = tmp / name
            out.mkdir()
            for f in GROUND_TRUTH_MAPS.values():
                _write_effect_map(src / f, out / f, target)
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                load_ground_truth(out, grid)
                ts.append(time.perf_counter() - t)
            res[name] = np.median(ts)
        shutil.rmtree(tmp)
        print(f"load_ground_truth, 4 maps (91x109x91 at 2 mm) onto {shape}: before {res['before'] * 1e3:.0f} ms, "
              f"after {res['after'] * 1e3:.0f} ms, after/before {res['after'] / res['before']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="f647cc3~1", help="revision whose run_probe_suite is 'before'")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--protocol", choices=("fast", "wide"), default="fast")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_probes(old_suite(args.before, Path(tmp)), args.n, args.protocol)
    bench_ground_truth()


if __name__ == "__main__":
    main()
