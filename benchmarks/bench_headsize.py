"""Head size (data/headsize.py): the eTIV's cost per subject and what it measures on synthetic cohorts.

Cost, timed alternately with the rest of a subject's preprocessing (``preprocess_image(head_size=False)``)
in one process and one BLAS thread:

* the synthetic cohort's 2 mm images (``--cohort``, the first ``--n`` subjects);
* an HCP-sized phantom: the MNI152 T1 inside its brain mask on HCP's 0.7 mm T1w box (260 x 311 x 260).

What it measures (``--cohort`` with a ground_truth.csv, every subject): log eTIV and log brain-mask volume
regressed on the planted log volume (3 log scale_factor) and the male indicator. The male coefficient is
how much of the local sex effect the measure contains beyond the planted global scale (the tissue recipe's
male occipital growth adds brain volume; the template recipe's temporal one barely does).

Run: ``python benchmarks/bench_headsize.py --cohort data/raw/synthetic [--n 20]``. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from threadpoolctl import threadpool_limits

from brainlatent.anatomy import load_template
from brainlatent.data.headsize import estimate_etiv
from brainlatent.data.hcp import load_synthetic
from brainlatent.data.preprocess import preprocess_image, read_brain
from brainlatent.data.synthetic import output_grid

SHAPE, FOV = (24, 32, 24), (176.0, 224.0, 176.0)  # the default processing grid


def hcp_phantom(path: Path) -> Path:
    """The template brain (T1 x mask, int16) on HCP's 0.7 mm T1w box."""
    tpl = load_template()
    grid = output_grid(0.7)
    to_tpl = np.linalg.inv(tpl.affine) @ grid.affine
    t1 = ndimage.affine_transform(tpl.t1 * tpl.brain_mask, to_tpl[:3, :3], to_tpl[:3, 3], grid.shape, order=1)
    mask = ndimage.affine_transform(tpl.brain_mask.astype(np.float32), to_tpl[:3, :3], to_tpl[:3, 3], grid.shape,
                                    order=1) >= 0.5  # fmt: skip
    data = np.where(mask, np.clip(np.rint(1000 * t1), 1, None), 0).astype(np.int16)
    nib.save(nib.Nifti1Image(data, grid.affine), path)
    return path


def time_pair(path: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of (preprocess without eTIV, eTIV alone from the read brain), alternated."""
    rest, etiv = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        preprocess_image(path, SHAPE, FOV, head_size=False)
        rest.append(time.perf_counter() - start)
        brain = read_brain(path)
        start = time.perf_counter()
        estimate_etiv(brain.data > 0, brain.affine, brain.center_mm)
        etiv.append(time.perf_counter() - start)
    return statistics.median(rest), statistics.median(etiv)


def what_it_measures(root: Path) -> pd.DataFrame:
    cohort = load_synthetic(root)
    truth = pd.read_csv(root / "ground_truth.csv", dtype={"Subject": str}).set_index("Subject")
    rows = []
    for s in cohort.subjects:
        brain = read_brain(s.image_path)
        rows.append({"male": float(s.sex == "M"), "log_scale3": 3 * np.log(truth.loc[s.subject_id, "scale_factor"]),
                     "mask": brain.volume_mm3,
                     "etiv": estimate_etiv(brain.data > 0, brain.affine, brain.center_mm).etiv_mm3})  # fmt: skip
    table = pd.DataFrame(rows)
    design = np.c_[np.ones(len(table)), table.log_scale3, table.male]
    out = []
    for name in ("mask", "etiv"):
        y = np.log(table[name].to_numpy())
        beta, *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = y - design @ beta
        out.append({"measure": name, "r with planted log volume": np.corrcoef(y, table.log_scale3)[0, 1],
                    "male coefficient (%)": 100 * beta[2], "residual SD (%)": 100 * residual.std(ddof=3)})  # fmt: skip
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, required=True, help="a synthetic cohort folder")
    parser.add_argument("--n", type=int, default=20, help="subjects timed at 2 mm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with threadpool_limits(1):
        estimate_etiv(*(lambda b: (b.data > 0, b.affine, b.center_mm))(read_brain(next(
            iter(load_synthetic(args.cohort).subjects)).image_path)))  # fmt: skip  # warm: template surface
        paths = [s.image_path for s in load_synthetic(args.cohort).subjects[: args.n]]
        pairs = [time_pair(p, 1) for p in paths]
        with tempfile.TemporaryDirectory() as tmp:
            hcp = time_pair(hcp_phantom(Path(tmp) / "hcp.nii.gz"), args.repeats)
        print("| input | rest of preprocess_image (s) | eTIV (s) | eTIV / rest |\n|---|---|---|---|")
        rest = statistics.median(p[0] for p in pairs)
        etiv = statistics.median(p[1] for p in pairs)
        print(f"| synthetic 2 mm (median of {len(pairs)}) | {rest:.3f} | {etiv:.3f} | {etiv / rest:.2f} |")
        print(f"| HCP-sized phantom 0.7 mm (median of {args.repeats}) | {hcp[0]:.3f} | {hcp[1]:.3f} | "
              f"{hcp[1] / hcp[0]:.2f} |")  # fmt: skip
        if (args.cohort / "ground_truth.csv").is_file():
            print(what_it_measures(args.cohort).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    sys.exit(main())
