"""Render time of the two synthetic recipes (``synth.recipe``: template, tissue) at the default 2 mm.

Times, in one process:

* model: building a recipe's template-space model (channels, effect fields, calibrations), once per worker;
* subject: rendering one subject and writing its NIfTI (``_make_subject``), median over ``--n`` subjects,
  the recipes alternating so that they share the machine's load;
* with ``--cohort N``: ``synthesize`` of N subjects with the config's 2 workers, per recipe (the default
  cohort is 160 subjects).

Run: ``python benchmarks/bench_synthetic.py [--n 8] [--cohort 160]``. Prints a table and writes the
"Synthetic cohorts" section of BENCHMARKS.md (replacing an earlier one).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from brainlatent import anatomy
from brainlatent.config import SynthConfig
from brainlatent.data import synthetic

RECIPES = ("template", "tissue")
SECTION = "## Synthetic cohorts"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(n: int, cohort: int) -> list[dict]:
    anatomy.load_template()  # nilearn's template: shared by both recipes, loaded once per process
    cfgs = {r: SynthConfig(recipe=r, n_subjects=n, workers=1) for r in RECIPES}
    rows = {r: {"recipe": r} for r in RECIPES}
    for r, cfg in cfgs.items():
        rows[r]["model_s"] = _seconds(lambda: synthetic._model(synthetic._model_key(cfg)))
    times: dict[str, list[float]] = {r: [] for r in RECIPES}
    draws = {r: synthetic.draw_subjects(cfg) for r, cfg in cfgs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            for r, cfg in cfgs.items():
                subjects, seeds = draws[r]
                times[r].append(_seconds(lambda: synthetic._make_subject(cfg, subjects[i], seeds[i], Path(tmp) / r)))
        for r, cfg in cfgs.items():
            rows[r]["subject_s"] = float(np.median(times[r]))
            if cohort:
                full = dataclasses.replace(cfg, n_subjects=cohort, workers=SynthConfig().workers)
                rows[r]["cohort_s"] = _seconds(lambda: synthetic.synthesize(full, Path(tmp) / f"{r}_cohort", False))
    return list(rows.values())


def table(rows: list[dict], n: int, cohort: int) -> str:
    head = f"| recipe | model build (once per worker) | render + write, median of {n} subjects |"
    rule = "|---|---|---|"
    if cohort:
        head += f" `synthesize`, {cohort} subjects, 2 workers |"
        rule += "---|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['recipe']} | {r['model_s']:.1f} s | {r['subject_s']:.2f} s |"
        lines.append(line + (f" {r['cohort_s']:.0f} s |" if cohort else ""))
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, numpy {np.__version__}; 1-min load average at start {load:.1f}")


def replace_section(path: Path, section: str, body: str) -> None:
    """Put ``## section`` with ``body`` in the Markdown file ``path``: in place of an earlier copy, else last."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n\n"
    earlier = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = earlier.sub(lambda _: block, text) if earlier.search(text) else f"{text.rstrip()}\n\n{block}"
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="subjects timed one by one per recipe")
    parser.add_argument("--cohort", type=int, default=0, help="also time synthesize() of this many subjects")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    info = machine()
    rows = run(args.n, args.cohort)
    ratio = rows[1]["subject_s"] / rows[0]["subject_s"]
    command = f"python benchmarks/bench_synthetic.py --n {args.n}" + (f" --cohort {args.cohort}" if args.cohort else "")
    body = (
        "Both recipes (docs/synthetic_cohort.md) at the default `synth.voxel_mm` 2 mm (91 x 109 x 91 voxels per "
        "subject), one process, the recipes alternating subject by subject. A cohort costs about one model build per "
        "worker plus the subjects divided among the workers, plus the effect maps (four noise-free renders).\n\n"
        f"{table(rows, args.n, args.cohort)}\n\n"
        f"Per subject, tissue / template: {ratio:.2f}x.\n\n"
        f"- Machine: {info}\n- Command: `{command}`\n- Date: {dt.date.today().isoformat()}"
    )
    print(table(rows, args.n, args.cohort))
    print(f"tissue / template per subject: {ratio:.2f}x")
    print(info)
    replace_section(args.out, SECTION, body)
    print(f"wrote section '{SECTION}' in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
