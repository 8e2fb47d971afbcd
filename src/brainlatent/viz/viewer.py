"""An interactive, offline brain viewer for an HTML page: nilearn's ``view_img`` (brainsprite) in an iframe.

nilearn's standalone page inlines its scripts (jQuery, brainsprite) and its images (data URIs); the one thing
it would fetch is its favicon from GitHub, which we drop, and :func:`external_references` lets a test (and
:func:`viewer_iframe` itself) prove nothing else is loaded. The page goes into ``<iframe srcdoc>``: each viewer
keeps its own document (nilearn's ids and scripts assume one), and the report stays one self-contained file.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
from nilearn import plotting

from brainlatent.viz.images import as_image
from brainlatent.viz.traversal import signed_map

_FAVICON = re.compile(r"<link[^>]*rel=[\"']icon[\"'][^>]*>", re.IGNORECASE | re.DOTALL)
# What makes a browser fetch on load: ``src`` / ``data`` of any tag, ``href`` of a <link> (a plain <a href> is a
# link the reader may follow, not a load); inline data: URIs and in-page #anchors excepted.
_FETCHING_ATTRIBUTE = re.compile(
    r"""(?:\b(?:src|data)|<link\b[^>]*?\bhref)\s*=\s*["']((?!data:|#)[^"']+)["']""", re.IGNORECASE | re.DOTALL)


def external_references(page: str) -> list[str]:
    """Every non-inline ``src`` / ``data`` attribute and ``<link href>`` of ``page``: what a browser would
    fetch while loading it."""
    return [m.group(1) for m in _FETCHING_ATTRIBUTE.finditer(page) if m.group(1).strip()]


def viewer_page(
    stat: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    voxel_mm: Sequence[float] | None = None,
    background: np.ndarray | None = None,
    title: str = "",
    vmax: float | None = None,
    threshold: float | None = None,
    width: int = 600,
) -> str:
    """A standalone HTML page: ``stat`` (X, Y, Z) over ``background`` in nilearn's interactive viewer (click to
    move the cuts; world coordinates and the value under the cursor shown), same colour limits and threshold
    as :func:`~brainlatent.viz.traversal.save_difference_map`. ValueError when it would load anything."""
    m = signed_map(stat, "viewer map", affine=affine, voxel_mm=voxel_mm, vmax=vmax, threshold=threshold)
    if background is not None and np.shape(background) != m.image.shape:
        raise ValueError(f"background {np.shape(background)} does not match the map {m.image.shape}")
    bg = as_image(background, m.affine) if background is not None else False
    view = plotting.view_img(m.image, bg_img=bg, threshold=m.threshold, vmax=m.vmax,
                             symmetric_cmap=True, cmap="RdBu_r", title=title or None, black_bg=True, dim=0,
                             resampling_interpolation="nearest", width_view=width)
    page = _FAVICON.sub("", view.get_standalone())
    fetched = external_references(page)
    if fetched:
        raise ValueError(f"nilearn's viewer page would load {fetched}: it is no longer self-contained")
    return page


def viewer_iframe(page: str, *, title: str, width: int = 660, height: int = 360) -> str:
    """``page`` (from :func:`viewer_page`) as an ``<iframe srcdoc>`` element to paste into another page."""
    # loading=lazy: a report with dozens of viewers starts only those scrolled into view.
    return (f'<iframe class=brain-viewer title="{html.escape(title)}" width={width} height={height} loading=lazy '
            f'style="border:0" srcdoc="{html.escape(page, quote=True)}"></iframe>')
