"""A picture of an HTML page (an audit or evaluation report) as headless Chromium renders it, for
the docs. Needs Debian's chromium and chromium-driver, as the browser tests do.

    python scripts/screenshot.py audit.html docs/images/audit-report.png [--width 1200] [--height 1600]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                     f"--window-size={args.width},{args.height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
        try:
            browser.get(args.page.resolve().as_uri())
            png = browser.get_screenshot_as_png()
        finally:
            browser.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.quantize(colors=128)  # a page of text and thumbnails: small without visible loss
    args.png.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.png, optimize=True)
    print(f"{args.png}: {image.width}x{image.height}, {args.png.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
