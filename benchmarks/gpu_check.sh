#!/usr/bin/env bash
# The prepared GPU check (issue 17, item 3): benchmarks/gpu_check.py on a machine that has PyTorch but not the
# rest of our dependencies and no network. Run from anywhere; it works from the repository root.
#
#   benchmarks/gpu_check.sh --fetch-wheels     # here, once: download the carried wheels into .whl/
#   benchmarks/gpu_check.sh [gpu_check.py options]      # there: install .whl/ if needed, then the check
#
# Results: $OUT (the device tool's output folder) or ./gpu_check_out: gpu_check.json, gpu_check.md and this
# run's log gpu_check.log. docs/research_scale.md ("GPU check") has the device command line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.whl
# What brainlatent's model and training code imports that the GPU image lacks (KINDS.md of the device tool):
# MONAI (metrics, inversion) and pydantic (params files), with pydantic's own dependencies.
# Names as wheel files spell them.
CARRIED="monai pydantic pydantic_core annotated_types typing_inspection typing_extensions"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # The versions installed here (the project's tested ones), built for the GPU machine's CPython 3.12.
    pins=$("$PYTHON" -c 'import importlib.metadata as m, sys; print(" ".join(f"{d}=={m.version(d)}" for d in sys.argv[1:]))' $CARRIED)
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" $pins
    # carry names ignored paths only: keep the wheelhouse out of git here.
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    ls -l "$WHEELS"
    exit 0
fi

if ! "$PYTHON" -c 'import monai, pydantic' 2>/dev/null; then
    wheels=()
    for name in $CARRIED; do  # ours only: other checks may carry other wheels in the same folder
        found=$(compgen -G "$WHEELS/$name-[0-9]*.whl" || true)
        if [[ -z "$found" ]]; then
            echo "gpu_check: monai/pydantic are missing and $WHEELS/ has no $name wheel: run" \
                 "'benchmarks/gpu_check.sh --fetch-wheels' on the development machine and carry $WHEELS" >&2
            exit 2
        fi
        wheels+=($found)
    done
    site=${TMPDIR:-/tmp}/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-./gpu_check_out}
mkdir -p "$out"
"$PYTHON" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
