"""`dvc plots show` draws the project's plots without internet.

The repository's .dvc/config points DVC at offline_plots/template.html, a page with vega, vega-lite and vega-embed
inlined (offline_plots/build_template.py). The browser test runs a bare `dvc plots show` in a tiny DVC repository
holding the project's own .dvc/config, template and plot definitions (dvc.yaml's `plots:`), opens the page in
headless Chromium with the network cut and checks that every chart drew; the same page built with DVC's default
template (scripts from a CDN) is the control that must stay blank, so the check can tell the two apart.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from e2e_utils import find_or_install_chromium, pipeline_env, render_offline, run

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "offline_plots" / "template.html"
ARTIFACTS = REPO / "test-artifacts"  # screenshots kept after the run; gitignored


def _builder():
    spec = importlib.util.spec_from_file_location("build_template", REPO / "offline_plots" / "build_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Resources(HTMLParser):
    """Every attribute of the page that would make the browser fetch something (src, href, data)."""

    def __init__(self):
        super().__init__()
        self.fetched: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.fetched += [f"<{tag} {k}={attrs[k]}>" for k in ("src", "href", "data") if attrs.get(k)]
        self.inline_scripts += tag == "script" and not attrs.get("src")


def test_the_committed_template_is_self_contained_and_wired_into_dvc():
    html = TEMPLATE.read_text(encoding="utf-8")
    page = _Resources()
    page.feed(html)
    assert page.fetched == [], f"{TEMPLATE} loads resources: {page.fetched}"
    assert page.inline_scripts == 1 and "window.vegaEmbed=" in html
    # DVC fills {plot_divs} (required); {scripts} would bring back its CDN <script> tags.
    assert html.count("{plot_divs}") == 1 and "{scripts}" not in html
    # .dvc/config (what a bare `dvc plots show` reads) names the template, relative to .dvc/ as DVC resolves it.
    config = (REPO / ".dvc" / "config").read_text()
    assert "html_template = ../offline_plots/template.html" in config.replace("\t", "    ")


def test_the_builder_refuses_a_bundle_it_cannot_inline():
    builder = _builder()
    html = builder.page("window.vegaEmbed = function () {};", "test bundle")
    assert "window.vegaEmbed = function () {};" in html and "<!-- test bundle -->" in html
    assert html.count("{plot_divs}") == 1 and html.count("{refresh_tag}") == 1 and "{scripts}" not in html
    ok = "window.vegaEmbed = function () {};"
    for bad in (f"{ok} x = '</SCRIPT>';", f"{ok} x = '<!--';", f"{ok} x = '{{plot_divs}}';", "x = 1;"):
        with pytest.raises(ValueError):
            builder.page(bad, "test bundle")


# ------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = find_or_install_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"offline plots test needs Chromium on CI: {why}")
        pytest.skip(f"offline plots test needs Chromium: {why}")
    return path


def _plots_repo(root: Path) -> tuple[Path, dict[str, str], int]:
    """A git + DVC repository with the project's .dvc/config, template and plot definitions, and plot CSVs in
    the columns the directions stage writes. Returns (repo, env, number of plots)."""
    root.mkdir()
    env = pipeline_env(root)
    run(["git", "init", "-q"], root, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    (root / "offline_plots").mkdir()
    shutil.copy(TEMPLATE, root / "offline_plots" / TEMPLATE.name)
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    fpr = np.linspace(0.0, 1.0, 21)
    steps = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    for definition in plots:
        path = root / next(iter(definition))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "roc.csv":
            frame = pd.DataFrame({"fpr": np.r_[fpr, fpr], "tpr": np.r_[fpr**0.3, fpr**0.6],
                                  "target": ["sex"] * 21 + ["age_old"] * 21})
        else:
            frame = pd.DataFrame({"step": np.r_[steps, steps], "quantity": ["ventricles"] * 5 + ["brain"] * 5,
                                  "direction": "age_old", "value": np.r_[0.1 * steps, -0.05 * steps]})
        frame.to_csv(path, index=False)
    return root, env, len(plots)


def _coloured_pixels(png: Path) -> int:
    """Pixels with a clear hue (chart lines and legend marks); a blank or text-only page has none."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def test_dvc_plots_show_draws_without_network(chromium, tmp_path):
    repo, env, n_plots = _plots_repo(tmp_path / "repo")
    ARTIFACTS.mkdir(exist_ok=True)

    shown = run([sys.executable, "-m", "dvc", "plots", "show"], repo, env)  # bare, as in the README
    index = repo / "dvc_plots" / "index.html"
    assert index.as_uri() in shown.stdout
    page = _Resources()
    page.feed(index.read_text(encoding="utf-8"))
    assert page.fetched == [], f"dvc plots show wrote a page that loads {page.fetched}"
    png = tmp_path / "dvc_plots_offline.png"
    dom = render_offline(chromium, index.as_uri(), png, tmp_path / "profile")
    shutil.copy(png, ARTIFACTS / png.name)
    charts = dom.count('class="marks"')  # vega-embed's <svg class="marks">, one per chart it drew
    assert charts == n_plots, f"{charts} of {n_plots} charts drawn"
    drawn = _coloured_pixels(png)
    assert drawn > 1000, f"{png}: {drawn} coloured pixels; the charts did not draw"

    # Control: DVC's own page (no html_template) loads vega from a CDN and must draw nothing offline.
    run([sys.executable, "-m", "dvc", "config", "--unset", "plots.html_template"], repo, env)
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", "default_plots"], repo, env)
    control = tmp_path / "dvc_plots_default_offline.png"
    dom = render_offline(chromium, (repo / "default_plots" / "index.html").as_uri(), control, tmp_path / "profile")
    shutil.copy(control, ARTIFACTS / control.name)
    assert 'class="marks"' not in dom and _coloured_pixels(control) < 50, (
        "DVC's CDN page drew charts with the network cut: the offline check cannot tell drawn from blank"
    )
