"""Peak resident memory of one training step, by volume size and batch (each case in a fresh process).

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CASE = """
import resource, dataclasses, json, torch
from brainlatent.config import load_params
from brainlatent.train.runner import make_task
p = load_params()
fam, shape, batch = {fam!r}, {shape!r}, {batch}
task = make_task(fam, p, shape, torch.device("cpu"))
task.steps_per_epoch = 1
task.on_epoch_start(10_000 if fam == "stylegan" else 0)
x = task.prepare_batch(torch.rand(batch, 1, *shape))
for i in range(2):
    task.train_step(x, 10_000 if fam == "stylegan" else 0, i)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def main() -> None:
    cases = [("ae", (24, 32, 24), 4), ("ae", (24, 32, 24), 16), ("ae", (64, 80, 64), 4), ("ae", (128, 160, 128), 2),
             ("vae", (64, 80, 64), 4), ("gan", (24, 32, 24), 4), ("stylegan", (24, 32, 24), 4),
             ("gan", (64, 80, 64), 4), ("stylegan", (64, 80, 64), 4)]
    print("| family | shape | batch | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for fam, shape, batch in cases:
        out = subprocess.run([sys.executable, "-c", CASE.format(fam=fam, shape=shape, batch=batch)],
                             capture_output=True, text=True)
        value = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")
        print(f"| {fam} | {'x'.join(map(str, shape))} | {batch} | {value:.0f} |", flush=True)


if __name__ == "__main__":
    main()
