"""The report renders in a headless browser: a screenshot is drawn and no image of the page is broken.

Needs Debian's chromium (``apt-get install chromium``); skipped with the reason when it is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoseg.report import write_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                                             "the browser rendering check needs it")

#: appended to a copy of the page: once everything is loaded, the title says how many images there are and
#: how many failed to decode (an image that did not load has naturalWidth 0)
IMAGE_CHECK = ("<script>window.addEventListener('load',function(){var im=document.images,b=0;"
               "for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0){b++;}}"
               "document.title='images:'+im.length+':broken:'+b;});</script>")


def chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run headless chromium on ``page`` with no network, sync or first-run work, in a private profile."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def render(page: Path, tmp: Path, screenshot: Path, size: str = "1280,4000") -> tuple[int, int]:
    """Screenshot ``page`` into ``screenshot`` and return (images on the page, images that failed to load)."""
    shot = chromium(page, tmp, f"--screenshot={screenshot}", f"--window-size={size}")
    assert screenshot.is_file(), f"chromium wrote no screenshot: {shot.stderr[-2000:]}"
    checked = tmp / "checked.html"
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = chromium(checked, tmp, "--dump-dom", "--virtual-time-budget=10000").stdout
    found = re.search(r"<title>images:(\d+):broken:(\d+)</title>", dom)
    assert found, f"the image check did not run; dumped DOM starts with {dom[:300]!r}"
    return int(found.group(1)), int(found.group(2))


@needs_chromium
def test_report_renders_in_a_browser_with_no_broken_image(trained_work, tmp_path):
    _, wd = trained_work
    page = write_report(wd, tmp_path / "report.html")
    n_images = page.read_text(encoding="utf-8").count("<img ")
    total, broken = render(page, tmp_path, tmp_path / "report.png")
    assert (total, broken) == (n_images, 0)
    with Image.open(tmp_path / "report.png") as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (4000, 1280)
    assert (pixels < 200).mean() > 0.01  # text and figures were drawn, not a blank page


@needs_chromium
def test_the_image_check_catches_a_broken_image(trained_work, tmp_path):
    _, wd = trained_work
    page = write_report(wd, tmp_path / "report.html", max_cases=0)
    text = page.read_text(encoding="utf-8")
    page.write_text(text.replace("<footer>", '<img src="data:image/png;base64,AAAA" alt="broken"><footer>'),
                    encoding="utf-8")
    total, broken = render(page, tmp_path, tmp_path / "report.png", size="800,600")
    assert broken == 1 and total == text.count("<img ") + 1
