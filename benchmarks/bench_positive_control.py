"""A positive control on a cohort, end to end: plant a known local effect into a seeded half of the subjects,
prepare, train a family and run the directions experiment on the planted label (docs/positive_controls.md).

Answers, on a given cohort, the questions issue 16 asks of the size-controlled probe with an effect whose truth
is known: does the ``planted`` probe find the label on held-out subjects, is its size-controlled twin above
chance, and which of the two directions' difference maps matches the planted effect map better?

Run on a project where ``brainlatent synth`` has run (e.g. one kept by ``bench_pipeline.py --keep``), once per
cohort::

    python benchmarks/bench_positive_control.py --project DIR --region occipital_poles --magnitude 0.3 --family ae

``--set KEY=VALUE`` (repeatable) is passed to the ``directions`` step only, e.g. ``--set
directions.size_axis=covariate`` to compare the size-controlled direction's head-size axes on the same control.
Every step is the CLI a user would type (``brainlatent plant / prepare / train / directions``) with
``--set data.processed_dir=data/processed_planted`` so the project's own processed cohort is left alone. The
control's numbers are read back from ``metrics/directions/<family>.json`` (the control's run overwrites that
file in the project; the MLflow runs of both stay). Prints one Markdown row per family, with wall time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("planted_auc", "planted_auc_low", "planted_auc_high", "planted_size_controlled_auc",
        "planted_size_controlled_auc_low", "planted_size_controlled_auc_high", "planted_map_r",
        "planted_map_r_size_controlled", "planted_map_r_beyond_size", "planted_map_r_beyond_size_size_controlled",
        "planted_map_r_global_size", "sex_size_controlled_auc", "sex_local_map_r_raw",
        "sex_local_map_r_size_controlled", "sex_local_map_r_beyond_size_raw",
        "sex_local_map_r_beyond_size_size_controlled", "size_axis_agreement")


def run(cmd: list[str], project: Path, timings: dict[str, float], name: str) -> None:
    started = time.perf_counter()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    timings[name] = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{name} failed ({done.returncode}): {' '.join(cmd)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True, help="holds params.yaml and the synthetic cohort")
    parser.add_argument("--effect", default="enlarge", choices=("enlarge", "scale", "intensity"))
    parser.add_argument("--region", default="occipital_poles")
    parser.add_argument("--magnitude", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", action="append", choices=("ae", "vae", "gan", "stylegan"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override for the directions step only (repeatable)")
    args = parser.parse_args()
    project = args.project.resolve()
    cli = [str(Path(sys.executable).with_name("brainlatent"))]
    planted_dir = "data/raw/planted"
    on_control = ["--set", "data.source=manifest", "--set", f"data.path={planted_dir}/manifest.csv",
                  "--set", "data.processed_dir=data/processed_planted"]
    timings: dict[str, float] = {}
    run(cli + ["plant", "--out", planted_dir, "--effect", args.effect, "--region", args.region,
               "--magnitude", str(args.magnitude), "--seed", str(args.seed)], project, timings, "plant")
    run(cli + ["prepare", *on_control], project, timings, "prepare")
    print(f"| family | {' | '.join(KEYS)} | train s | directions s |")
    print("|---|" + "---|" * (len(KEYS) + 2))
    for family in args.family or ["ae"]:
        run(cli + ["train", "--model", family, *on_control], project, timings, f"train@{family}")
        overrides = [arg for kv in args.overrides for arg in ("--set", kv)]
        run(cli + ["directions", "--model", family, *on_control, *overrides], project, timings, f"directions@{family}")
        metrics = json.loads((project / "metrics" / "directions" / f"{family}.json").read_text())
        cells = [f"{metrics[k]:.3g}" if isinstance(metrics.get(k), (int, float)) else "-" for k in KEYS]
        print(f"| {family} | {' | '.join(cells)} | {timings[f'train@{family}']:.0f} | "
              f"{timings[f'directions@{family}']:.0f} |", flush=True)
    print(f"\nplant {timings['plant']:.0f} s, prepare {timings['prepare']:.0f} s; effect {args.effect} "
          f"{args.region} x(1 + {args.magnitude}), seed {args.seed}, project {project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
