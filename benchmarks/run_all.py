"""Run every benchmark and print its table (`make bench`). Results go to BENCHMARKS.md by hand, with the
machine, command and date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    ["bench_conv_layout.py"],
    ["bench_training.py", "--compare-layouts", "--families", "ae"],
    ["bench_training.py"],
    ["bench_training.py", "--shape", "64", "80", "64", "--families", "ae", "vae", "--batch", "4", "--steps", "2"],
    ["bench_inversion.py"],
    ["bench_memory.py"],
    ["bench_preprocess.py", "--n", "2", "--repeats", "2"],
]


def main() -> int:
    failed = 0
    for script, *args in SCRIPTS:
        path = HERE / script
        if not path.exists():
            continue
        print(f"\n## {script} {' '.join(args)}", flush=True)
        failed += subprocess.call([sys.executable, str(path), *args]) != 0
    return failed


if __name__ == "__main__":
    sys.exit(main())
