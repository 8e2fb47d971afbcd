"""The report's interactive brain viewers draw in headless Chromium with the network cut.

The page is the report's own HTML (:func:`brainlatent.report.to_html`) for a family with one direction map. The
control is the same page with the viewers' scripts removed: it must stay blank where the viewer draws, so the
check tells a drawn viewer from an empty frame. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainlatent.grid import Grid
from brainlatent.report import ReportContent, family_section, to_html
from brainlatent.viz.direction_maps import find_maps, render_direction_maps
from brainlatent.viz.montage import save_nifti
from brainlatent.viz.viewer import external_references
from e2e_utils import render_offline
from test_plots_offline import chromium  # noqa: F401  (the fixture: Chromium found or installed, else skip)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
GRID = Grid.box((24, 32, 24), (176.0, 224.0, 176.0), (0.0, -18.0, 18.0))


def _directions_folder(root: Path) -> Path:
    """directions/vae as the directions stage leaves it: one mean-difference map (a blob left of the midline,
    positive, one right, negative) and its t map."""
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in GRID.shape], indexing="ij")
    blob = lambda x: np.exp(-((ii - x) ** 2 + (jj - 14) ** 2 + (kk - 14) ** 2) / 6.0)  # noqa: E731
    diff = (0.2 * blob(7) - 0.15 * blob(16)).astype(np.float32)
    folder = root / "directions" / "vae"
    save_nifti(diff, GRID.affine, folder / "maps" / "age_old_mean_difference.nii.gz")
    save_nifti(diff * 20, GRID.affine, folder / "maps" / "age_old_t_statistic.nii.gz")
    return folder


def _content(maps) -> ReportContent:
    table = pd.DataFrame({"mse": [0.01], "directions.age_old_auc": [0.9]}, index=pd.Index(["vae"], name="family"))
    models = pd.DataFrame({"model_version": ["3"], "has_samples": [True]}, index=pd.Index(["vae"], name="family"))
    return ReportContent(top=None, sections={"vae": family_section("vae", table, models, None)}, maps={"vae": maps},
                         planted=[],
                         table=table, models=models, summary=None, notes=[], warnings=[], figures={})


def _red(png: Path, box: tuple[int, int, int, int]) -> int:
    """Red pixels in ``box``: the map's positive blob and colour bar (the page's own widgets are blue or grey)."""
    rgb = np.asarray(Image.open(png).convert("RGB").crop(box)).astype(int)
    return int(((rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 40)).sum())


def test_report_viewer_draws_offline(chromium, tmp_path):
    folder = _directions_folder(tmp_path)
    assert list(find_maps(folder)) == ["age_old"]  # the t map is not shown twice
    background = np.full(GRID.shape, 0.5, np.float32)
    maps = render_direction_maps("vae", folder, tmp_path / "report" / "maps", background)
    assert maps[0].glass_png == tmp_path / "report" / "maps" / "vae" / "age_old_glass.png"
    page = to_html(_content(maps))
    assert external_references(page) == [], "the report would load something over the network"
    assert page.count("<iframe") == 1 and page.count("<img src=\"data:image/png;base64,") == 1  # + glass brain

    index = tmp_path / "report" / "index.html"
    index.write_text(page, encoding="utf-8")
    # The control: the same page, the viewer's scripts stripped out of its srcdoc.
    control = tmp_path / "report" / "control.html"
    control.write_text(re.sub(r"&lt;script.*?&lt;/script&gt;", "", page, flags=re.DOTALL), encoding="utf-8")
    ARTIFACTS.mkdir(exist_ok=True)
    shots = {}
    for name, url in (("report_viewer_offline.png", index), ("report_viewer_no_scripts.png", control)):
        png = tmp_path / name
        dom = render_offline(chromium, url.as_uri(), png, tmp_path / "profile")
        assert dom.count("<iframe") == 1
        shutil.copy(png, ARTIFACTS / name)
        shots[name] = png
    # The viewer's frame: below the section's heading, left of the page, above the glass brain (red in both).
    frame_box = (30, 340, 700, 680)
    drawn = _red(shots["report_viewer_offline.png"], frame_box)
    blank = _red(shots["report_viewer_no_scripts.png"], frame_box)
    assert drawn > 1000 and blank == 0, f"red pixels in the viewer's frame: {drawn} drawn, {blank} without its JS"
