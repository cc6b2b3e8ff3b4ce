"""HTML pages that open without a network: what DVC's plots and great-expectations' Data Docs load
from CDNs, vendored here from the npm registry at pinned versions, with their licences.

- `dvc plots show` renders Vega-Lite specs with Vega, Vega-Lite and Vega-Embed, which DVC's page
  loads from cdn.jsdelivr.net. The project's `.dvc/config` names a page template instead
  (`plots.html_template`) with the three inlined (`plots_template`), so the page DVC writes works
  offline and on its own, wherever it is copied.
- GX Data Docs load Bootstrap, jQuery, Popper, bootstrap-table, bootstrap-datepicker, Font Awesome
  and Vega from five CDNs, and the GX logo from S3. `localize_site` copies the vendored files into
  the site (`static/vendor/`) and points every page at them (and at the logo the site already has).

What is vendored, and the checksums of the registry's tarballs and of each file, is
`assets.json` (scripts/vendor_web_assets.py fetches and checks them; a test checks the files and
the template against it). The versions are the ones the two tools name: DVC's renderer pins Vega
5.20.2, Vega-Lite 5.2.0 and Vega-Embed 6.18.2; GX's templates pin the rest (`vega@5`, `vega-lite@5`
and `vega-embed@6` float there: the pinned ones stand in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
ASSETS = HERE / "assets.json"  # the packages, their files, integrity and sha256
VENDOR = HERE / "vendor"  # <name>@<version>/<file as in the package>
SITE_VENDOR = Path("static") / "vendor"  # where a Data Docs site gets its copies
PLOTS_SCRIPTS = ("vega@5.20.2/build/vega.min.js", "vega-lite@5.2.0/build/vega-lite.min.js",
                 "vega-embed@6.18.2/build/vega-embed.min.js")

# What the GX Data Docs templates load, and the vendored file standing in for each.
GX_CDN = {
    "https://cdn.jsdelivr.net/npm/vega@5": PLOTS_SCRIPTS[0],
    "https://cdn.jsdelivr.net/npm/vega-lite@5": PLOTS_SCRIPTS[1],
    "https://cdn.jsdelivr.net/npm/vega-embed@6": PLOTS_SCRIPTS[2],
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery@3.7.1/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        "popper.js@1.12.9/dist/umd/popper.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        "bootstrap@4.3.1/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        "bootstrap@4.3.1/dist/js/bootstrap.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        "bootstrap-table@1.19.1/dist/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        "bootstrap-table@1.19.1/dist/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker@1.9.0/dist/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker@1.9.0/dist/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "@fortawesome/fontawesome-free@6.6.0/css/all.min.css",
}
GX_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.[a-z0-9-]+\.amazonaws\.com/(logo-long\.png)(\?[^\"']*)?")
# A script or stylesheet a page loads from elsewhere (links people click are not loads).
REMOTE_LOAD = re.compile(r"<(?:script|img)\b[^>]*\bsrc=[\"'](https?://[^\"']+)|"
                         r"<link\b[^>]*\bhref=[\"'](https?://[^\"']+)[\"'][^>]*rel=[\"']stylesheet|"
                         r"<link\b[^>]*rel=[\"']stylesheet[\"'][^>]*href=[\"'](https?://[^\"']+)", re.I)


def packages() -> list[dict[str, Any]]:
    return list(json.loads(ASSETS.read_text())["packages"])


def remote_loads(html: str) -> list[str]:
    """The URLs a page loads scripts, stylesheets or images from over the network."""
    return [next(g for g in m.groups() if g) for m in REMOTE_LOAD.finditer(html)]


def _package_dir(vendored: str) -> str:
    """`name@version` of a vendored file's path (scoped names keep their scope)."""
    parts = vendored.split("/")
    return "/".join(parts[:2] if vendored.startswith("@") else parts[:1])


def localize_site(site: str | os.PathLike[str]) -> list[Path]:
    """Make a Data Docs site at `site` open offline: copy each vendored package it needs (the
    whole vendored folder: Font Awesome's stylesheet reaches its fonts relatively, and the licence
    travels along) to `<site>/static/vendor/`, and rewrite every page's CDN addresses to relative
    paths to them. Returns the pages rewritten."""
    site = Path(site)
    needed = sorted({_package_dir(v) for v in GX_CDN.values()})
    for name in needed:
        shutil.copytree(VENDOR / name, site / SITE_VENDOR / name, dirs_exist_ok=True)
    pages = []
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        up = os.path.relpath(site, page.parent).replace(os.sep, "/")
        new = text
        for url, vendored in GX_CDN.items():
            new = new.replace(f'"{url}"', f'"{up}/{SITE_VENDOR.as_posix()}/{vendored}"')
        new = GX_LOGO.sub(f"{up}/static/images/\\1", new)
        if new != text:
            page.write_text(new, encoding="utf-8")
            pages.append(page)
    return pages


def plots_template() -> str:
    """The page template `dvc plots show` fills (`plots.html_template`): DVC's own page, with
    Vega, Vega-Lite and Vega-Embed inlined where DVC's has `{scripts}` (CDN tags), so nothing is
    loaded from the network. Their licences head the page, as BSD-3-Clause asks."""
    notices = []
    scripts = []
    for rel in PLOTS_SCRIPTS:
        name = _package_dir(rel)
        licence = (VENDOR / name / "LICENSE").read_text(encoding="utf-8").replace("--", "- -")
        notices.append(f"{name} ({rel.split('/', 1)[1]}), from the npm registry:\n{licence.strip()}")
        code = (VENDOR / rel).read_text(encoding="utf-8")
        if "</script" in code.lower() or "<!--" in code:
            raise ValueError(f"{rel} cannot be inlined in a <script> element as it is")
        scripts.append(f"<script>{code}</script>")
    return "\n".join([
        "<!DOCTYPE html>",
        "<!-- The page `dvc plots show` writes (.dvc/config: plots.html_template), DVC's own with its",
        "CDN scripts inlined, so it opens without a network. Made by scripts/vendor_web_assets.py from",
        "tasn/offline/vendor/ (pinned in tasn/offline/assets.json).",
        "",
        "\n\n".join(notices),
        "-->",
        "<html>",
        "<head>",
        "    {refresh_tag}",
        "    <title>DVC Plot</title>",
        *scripts,
        "    <style>",
        "        table {",
        "            border-spacing: 15px;",
        "        }",
        "    </style>",
        "</head>",
        "<body>",
        "    {plot_divs}",
        "</body>",
        "</html>",
        "",
    ])
