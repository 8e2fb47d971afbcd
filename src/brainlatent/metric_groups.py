"""Metric names grouped by prefix, the way MLflow's chart view sections them.

Its own module, free of MLflow, because the training loop uses it and the GPU check (benchmarks/gpu_check.py)
runs that loop's steps on a machine without MLflow.
"""

from __future__ import annotations


def grouped(group: str, values: dict[str, float]) -> dict[str, float]:
    """``{"mse": 1.0}`` -> ``{"val/mse": 1.0}`` for ``group="val"``. Curves are logged as ``<group>/<name>``
    (train/, val/, schedule/, kept/) because MLflow's chart view draws one section per prefix."""
    return {f"{group}/{k}": v for k, v in values.items()}
