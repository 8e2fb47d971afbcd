"""The MLflow UI, served by a real `mlflow server` on a temporary SQLite store and opened in headless Chromium:
the links we print open the model-training pages, the runs table's Dataset column names the processed cohort,
the chart view draws the four families' validation curves, a registered version shows its description.

The store holds what training logs (per-epoch validation metrics of one run per family, each with the processed
cohort as input via tracking.log_dataset, one registered version via registry.log_and_register), without
training anything: the test is about what the UI shows of it. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from brainlatent import registry, tracking
from brainlatent.config import FAMILIES
from brainlatent.models.base import build_model
from e2e_utils import free_port, render_dom, screenshot, stop_process_group, wait_healthy
from test_plots_offline import chromium  # noqa: F401  (the fixture: Chromium found or installed, else skip)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
EPOCHS = 5


@pytest.fixture
def logged(project, tiny_processed):
    """Per family a finished training run with its validation curve and dataset; the AE registered."""
    tracking.configure(project)
    lineage = tracking.lineage_tags("data/processed", project)
    exp = tracking.experiment_id(tracking.TRAIN_EXPERIMENT, project)
    for i, family in enumerate(FAMILIES):
        metric = registry.VALIDATION_METRICS[family][0]
        with mlflow.start_run(experiment_id=exp, run_name=f"{family}-ui-test",
                              tags={"model": family, "stage": "train", **lineage}) as run:
            tracking.log_dataset("data/processed", "training", project, lineage)
            for epoch in range(1, EPOCHS + 1):
                mlflow.log_metrics({metric: (1 + i) / epoch, "train/loss": 2 * (1 + i) / epoch}, step=epoch)
            if family == "ae":
                model = build_model("ae", {"latent_dim": 4, "volume_shape": [16, 16, 16], "hidden": [8]})
                registry.log_and_register(model, family, model.config_dict(), {metric: 1 / EPOCHS},
                                          tags={**lineage, "run_id": run.info.run_id})
    return exp, lineage


@pytest.fixture
def server(project, logged):
    port = free_port()
    log = (project / "mlflow-server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri(project),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health", proc, timeout=300)  # a loaded 2-core machine: the UI server is slow to start
        yield base
    finally:
        stop_process_group(proc)
        log.close()


def _open(chromium, url: str, name: str, tmp_path: Path, ready: str, window: str = "1400,900") -> str:
    """The DOM after the UI rendered ``url`` (``ready`` in it); its screenshot kept in test-artifacts/.

    Chromium's virtual-time budget does not wait for the server's replies: on a loaded machine the page can be
    dumped before the UI's requests came back. One slow render is retried with a longer budget; the test's
    assertions then run on what the UI drew."""
    for budget_ms in (25000, 60000, 120000):
        dom = render_dom(chromium, url, tmp_path / "profile", budget_ms=budget_ms, window=window)
        if ready in dom:
            break
    png = screenshot(chromium, url, tmp_path / name, tmp_path / "profile", budget_ms=budget_ms, window=window)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(png, ARTIFACTS / name)
    (ARTIFACTS / name).with_suffix(".html").write_text(dom, encoding="utf-8")
    return dom


def test_the_ui_shows_datasets_curves_and_descriptions(logged, server, chromium, monkeypatch, tmp_path):
    exp, lineage = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    mlflow.set_tracking_uri(server)  # our links point at this server, as they do under a tracking server

    table = _open(chromium, tracking.experiment_url(exp), "ui_runs_datasets.png", tmp_path,
                  ready=f"{FAMILIES[-1]}-ui-test")
    for family in FAMILIES:
        assert f"{family}-ui-test" in table, f"run of {family} not in the runs table"
    digest = tracking.dataset_digest(lineage)
    cell = f'<span title="data/processed ({digest})"'  # the Dataset column's cell: name (digest)
    assert table.count(cell) == len(FAMILIES), "the Dataset column is not filled for every run"

    # Tall enough that the chart view draws both sections (it renders charts lazily, as they scroll into view).
    charts = _open(chromium, tracking.experiment_url(exp, charts=True), "ui_validation_curves.png", tmp_path,
                   ready='class="main-svg', window="1400,1600")
    for metric in {m for m, _ in registry.VALIDATION_METRICS.values()}:
        assert metric in charts, f"no chart of {metric}"
    sections = re.findall(r'compare-runs-section-header.*?white-space: pre;">([^<]+)</div>', charts)
    assert {"train", "val"} <= set(sections), f"metrics not grouped by prefix into sections: {sections}"
    assert charts.count('class="main-svg') >= 2  # plotly drew the charts, not only their titles

    version = _open(chromium, f"{server}/#/models/{registry.registered_name('ae')}/versions/1",
                    "ui_model_version.png", tmp_path, ready="trained in run")
    assert "trained in run" in version and f"val/mse {1 / EPOCHS:.4g}" in version
