"""Check that a report renders in headless Chromium: every image decoded, no console errors.

A copy of the report gets a small inline script (`RENDER_CHECK`) that writes its verdict to
`<body data-render=...>` once the page has loaded: every image decoded (`complete &&
naturalWidth > 0`) and no script error. `--dump-dom` prints the DOM after that, and
`--enable-logging=stderr` prints every console message (a clean report logs none).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

RENDER_CHECK = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); });
  window.addEventListener("load", function () {
    var imgs = document.getElementsByTagName("img"), bad = [];
    for (var i = 0; i < imgs.length; i++) {
      if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { bad.push(imgs[i].alt || i); }
    }
    var status = bad.length ? "broken:" + bad.join("|") : "ok:" + imgs.length;
    if (errors.length) { status += ";errors:" + errors.join("|"); }
    document.body.setAttribute("data-render", status);
  });
})();
"""


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclasses.dataclass
class RenderResult:
    status: str  # "ok:N" | "broken:..." (+ ";errors:...") | "" when the script never ran
    images: int
    console: list[str]  # console messages Chromium logged

    @property
    def ok(self) -> bool:
        return self.status.startswith("ok:") and ";errors:" not in self.status and not self.console


def check_rendering(path: str | Path, browser: str | None = None, timeout: float = 60.0):
    """Load `path` in headless Chromium and return what the page reported about itself."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no chromium executable on PATH")
    with tempfile.TemporaryDirectory(prefix="moesaic-chromium-") as profile:
        page = Path(profile) / "page.html"
        text = Path(path).read_text()
        page.write_text(text.replace("</head>", f"<script>{RENDER_CHECK}</script></head>", 1))
        url = page.resolve().as_uri()
        proc = subprocess.run(
            [
                browser,
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    match = re.search(r'data-render="([^"]*)"', proc.stdout)
    status = match.group(1) if match else ""
    images = len(re.findall(r"<img\b", proc.stdout))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return RenderResult(status, images, console)
