"""The whole default pipeline (`make repro`'s `dvc repro`) on one or both synthetic cohorts, timed per stage, with
the numbers that say whether each family makes brains and what the directions found.

For each ``--recipe`` (``synth.recipe``: ``template`` is the embedded default cohort, ``tissue`` the differently made
second one, docs/synthetic_cohort.md) it builds a fresh git + DVC project from this checkout's ``dvc.yaml``,
``params.yaml`` (with ``synth.recipe`` set and any ``--set key=value``) and ``src/``, runs ``dvc repro`` there and
reads back ``metrics/evaluate/*.json`` and ``metrics/directions/*.json``. Stage times come from the moments DVC
announces each stage ("Running stage ...") in its output.

Run: ``python benchmarks/bench_pipeline.py --recipe template --recipe tissue [--set gan.epochs=20] [--keep DIR]``;
``--params params.research.yaml --set-file benchmarks/research_short.yaml`` starts from another params file and a
YAML file of dotted-key overrides (the shortened research run, docs/research_scale.md).
Prints Markdown tables (stage seconds; sample quality beside its floors; directions) per recipe. A 2-core machine
takes ~12-15 min per recipe; run it on a quiet machine when the stage times matter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("ae", "vae", "gan", "stylegan")
SAMPLERS = ("vae", "gan", "stylegan")
QUALITY = ("c2st_auc", "intensity_w1", "coverage", "density", "tissue_tv")
DIRECTIONS = ("sex_auc", "sex_size_controlled_auc", "sex_brain_mask_volume_auc", "age_old_auc", "age_old_pca_voxels_auc",
              "age_old_pca_reconstructions_auc",
              "age_map_r", "sex_local_map_r_raw", "sex_local_map_r_size_controlled",
              "sex_local_map_r_beyond_size_raw", "sex_local_map_r_beyond_size_size_controlled",
              "sex_local_map_r_global_size", "age_ventricle_monotonicity", "encode_psnr_db")


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def make_project(dest: Path, recipe: str, overrides: list[str], params_file: Path = REPO / "params.yaml",
                 set_file: Path | None = None) -> dict[str, str]:
    """A fresh git + DVC repository at ``dest`` holding this checkout's pipeline, its params.yaml made from
    ``params_file``, the dotted keys of ``set_file`` and then ``overrides``; returns the environment."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    raw = yaml.safe_load(Path(params_file).read_text())
    _set(raw, "synth.recipe", recipe)
    for key, value in (yaml.safe_load(Path(set_file).read_text()) if set_file else {}).items():
        _set(raw, key, value)
    for item in overrides:
        key, value = item.split("=", 1)
        _set(raw, key, yaml.safe_load(value))
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg", "GIT_PYTHON_REFRESH": "quiet", "BRAINLATENT_ROOT": str(dest),
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return env


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pipeline(project: Path, env: dict[str, str], log: Path) -> tuple[dict[str, float], float, float]:
    """`dvc repro` in ``project``; (seconds per stage, total wall seconds, CPU seconds of dvc and every stage
    it ran). The CPU time hardly depends on what else runs on the machine, the wall time does: on a shared
    machine read the CPU time (a quiet 2-core run's wall time was 0.70x its CPU time, BENCHMARKS.md Run A)."""
    stages: dict[str, float] = {}
    cpu0 = _children_cpu_seconds()
    current, started = None, time.perf_counter()
    t0 = started
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("Running stage '"):
                now = time.perf_counter()
                if current is not None:
                    stages[current] = now - t0
                current, t0 = line.split("'")[1], now
        proc.wait()
    end = time.perf_counter()
    if current is not None:
        stages[current] = end - t0
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {project} (exit {proc.returncode}); see {log}")
    return stages, end - started, _children_cpu_seconds() - cpu0


def _read(project: Path, kind: str, family: str) -> dict:
    path = project / "metrics" / kind / f"{family}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tables(project: Path, stages: dict[str, float], total: float, cpu: float) -> str:
    """Markdown: stage seconds, sample quality beside its floors, directions."""
    lines = [f"Total {total / 60:.1f} min ({total:.0f} s) wall, {cpu / 60:.1f} min ({cpu:.0f} s) CPU "
             f"(load average at the end {os.getloadavg()[0]:.1f}).", "", "| stage | s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in stages.items()]
    ev = {f: _read(project, "evaluate", f) for f in FAMILIES}
    recon = {k: ev["ae"].get(f"floor_recon.{k}") for k in QUALITY}
    lines += ["", "| family | " + " | ".join(QUALITY) + " | intensity_w1 / AE recon | fid | model_version |",
              "|---|" + "---|" * (len(QUALITY) + 3)]
    real = {k: next((ev[f].get(f"floor_real.{k}") for f in SAMPLERS if f"floor_real.{k}" in ev[f]), None)
            for k in QUALITY}
    lines.append("| real-vs-real floor | " + " | ".join(_fmt(real[k]) for k in QUALITY) + " | | | |")
    lines.append("| AE reconstructions | " + " | ".join(_fmt(recon[k]) for k in QUALITY) + " | 1 | | "
                 f"{ev['ae'].get('model_version', '-')} |")
    for fam in SAMPLERS:
        m = ev[fam]
        ratio = (m["intensity_w1"] / recon["intensity_w1"]) if m.get("intensity_w1") and recon["intensity_w1"] else None
        lines.append(f"| {fam} | " + " | ".join(_fmt(m.get(k)) for k in QUALITY)
                     + f" | {_fmt(ratio)} | {_fmt(m.get('fid'))} | {m.get('model_version', '-')} |")
    di = {f: _read(project, "directions", f) for f in FAMILIES}
    lines += ["", "| directions | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    lines += [f"| {key} | " + " | ".join(_fmt(di[f].get(key)) for f in FAMILIES) + " |" for key in DIRECTIONS]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", choices=("template", "tissue"), help="repeatable")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="build the projects under this folder and keep them")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the params file to start from")
    parser.add_argument("--set-file", type=Path, help="YAML mapping of dotted keys to values, applied before --set")
    args = parser.parse_args()
    recipes = args.recipe or ["template"]
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    print(f"# Whole pipeline per cohort, {dt.date.today()}: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; params {args.params.name}, set-file {args.set_file or 'none'}, "
          f"overrides: {args.overrides or 'none'}\n")
    for recipe in recipes:
        project = base / recipe
        if project.exists():
            shutil.rmtree(project)
        env = make_project(project, recipe, args.overrides, args.params, args.set_file)
        stages, total, cpu = run_pipeline(project, env, base / f"{recipe}.log")
        print(f"## synth.recipe: {recipe} ({project})\n\n{tables(project, stages, total, cpu)}\n", flush=True)
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
