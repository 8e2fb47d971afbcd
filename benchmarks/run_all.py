"""Run every benchmark (`make bench`): each prints a Markdown table; all of them, with the machine and the
date, are also written to benchmarks/latest.md. Numbers worth keeping go to BENCHMARKS.md by hand, with the
machine, command and date."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
PROCESSED = Path("data/processed")  # bench_ae_architecture needs a prepared cohort (`dvc repro prepare`)
RAW = Path("data/raw/synthetic")  # bench_headsize needs the synthetic cohort (`dvc repro synthesize`)
NEEDS = {"bench_ae_architecture.py": PROCESSED, "bench_quality.py": PROCESSED, "bench_headsize.py": RAW}
SCRIPTS = [
    ["bench_conv_layout.py"],
    ["bench_training.py", "--compare-layouts", "--families", "ae"],
    ["bench_training.py"],
    ["bench_training.py", "--families", "ae", "vae", "--data-path", "--optimizers"],
    ["bench_training.py", "--families", "ae", "vae", "--arch", "conv"],
    ["bench_training.py", "--shape", "64", "80", "64", "--families", "ae", "vae", "--batch", "4", "--steps", "2",
     "--arch", "conv"],
    ["bench_training.py", "--shape", "64", "80", "64", "--families", "stylegan", "--batch", "4", "--steps", "2"],
    ["bench_compile.py"],
    ["bench_lazy_r1.py"],
    ["bench_adversarial_steps.py"],
    ["bench_inversion.py"],
    ["bench_memory.py"],
    ["bench_preprocess.py", "--n", "2", "--repeats", "2"],
    ["bench_synthetic.py", "--n", "4"],
    ["bench_ae_architecture.py", "--processed", str(PROCESSED)],
    ["bench_quality.py", "--processed", str(PROCESSED)],
    ["bench_headsize.py", "--cohort", str(RAW)],
]


def main() -> int:
    out = HERE / "latest.md"
    failed = 0
    with open(out, "w") as report:
        header = (f"# Benchmarks, {datetime.date.today()}: {platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
        print(header, flush=True)
        report.write(header)
        for script, *args in SCRIPTS:
            needs = NEEDS.get(script)
            if needs is not None and not needs.is_dir():
                print(f"\n(skipped {script}: no {needs}; run `dvc repro` first)", flush=True)
                continue
            title = f"\n## {script} {' '.join(args)}\n"
            print(title, flush=True)
            proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
            print(proc.stdout, flush=True)
            report.write(title + proc.stdout)
            if proc.returncode != 0:
                failed += 1
                print(proc.stderr[-3000:], file=sys.stderr, flush=True)
                report.write(f"\n(failed with exit code {proc.returncode})\n")
    print(f"\nwritten to {out}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
