"""Build offline_plots/template.html: the page `dvc plots show` fills (`plots.html_template` in .dvc/config), with
vega, vega-lite and vega-embed inlined so the ROC and effect-vs-step plots draw without internet.

DVC's default page loads the three libraries from a CDN, so on an offline machine (many hospital and HPC clusters)
it stays blank. vl-convert-python bundles them, with their dependencies, into one self-contained script; its
output is committed, so nothing is downloaded when `dvc plots show` runs. To rebuild (e.g. after upgrading
vl-convert-python for a newer vega):

    pip install vl-convert-python==1.9.0.post1
    python offline_plots/build_template.py           # writes offline_plots/template.html
    python offline_plots/build_template.py --check   # exit 1 when the committed page differs from a fresh build
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from importlib.metadata import version
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).with_name("template.html")
# DVC's built-in plot templates are Vega-Lite v5 specs ($schema .../vega-lite/v5.json): keep the v5 library.
VEGA_LITE = "5.21"
# DVC substitutes these anywhere in the page (dvc_render.html.HTML.embed): {plot_divs} (required) and
# {refresh_tag}; {scripts} would add DVC's CDN <script> tags, so the page leaves it out.
DVC_PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
# Inside an inline <script>, these would end it or switch the HTML parser into its script-escape states.
SCRIPT_BREAKERS = ("</script", "<!--", "<script")

PAGE = Template("""<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- $about -->
    <script type="text/javascript">
(() => {
"use strict";  // module semantics, and the bundle's top-level names stay out of the page's global scope
$bundle
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
""")


def page(bundle: str, about: str) -> str:
    """The HTML template around ``bundle`` (JavaScript that defines ``window.vegaEmbed``); ``about`` goes into
    a comment. ValueError when the bundle cannot be inlined safely."""
    lowered = bundle.lower()
    for text in SCRIPT_BREAKERS:
        if text in lowered:
            raise ValueError(f"the JavaScript bundle holds {text!r}, which would break its inline <script> tag")
    for text in (*DVC_PLACEHOLDERS, "-->"):
        if text in bundle or text in about:
            raise ValueError(f"{text!r} in the bundle or its description: DVC or the HTML parser would act on it")
    if "window.vegaEmbed" not in bundle:
        raise ValueError("the JavaScript bundle does not define window.vegaEmbed, which DVC's plot <div>s call")
    return PAGE.substitute(bundle=bundle, about=about)


def build() -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    about = (f"vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE}, vega-embed "
             f"{vl_convert.get_vega_embed_version()} inlined by offline_plots/build_template.py with "
             f"vl-convert-python {version('vl-convert-python')}; bundle sha256 "
             f"{hashlib.sha256(bundle.encode()).hexdigest()}")
    return page(bundle, about)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed page, write nothing")
    args = parser.parse_args(argv)
    html = build()
    if args.check:
        same = TEMPLATE.is_file() and TEMPLATE.read_text(encoding="utf-8") == html
        print(f"{TEMPLATE}: {'up to date' if same else 'differs from a fresh build'}")
        return 0 if same else 1
    TEMPLATE.write_text(html, encoding="utf-8")
    print(f"wrote {TEMPLATE} ({len(html.encode()) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
