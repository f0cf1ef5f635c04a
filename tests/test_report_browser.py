"""The report page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright over the DevTools
protocol): it renders with every figure decoded, no console error, no request leaving the page, nothing wider
than the window, and every section filled."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from report_helpers import build_demo_report_workspace, build_protocols_workspace

from stages.report import main as report_main

pytestmark = pytest.mark.slow  # a browser process per module: not in `make test-fast`

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "apt-get install -y chromium (Debian's package; the test never downloads a browser)"


def chromium_path() -> Path | None:
    if CHROMIUM.is_file():
        return CHROMIUM
    found = shutil.which("chromium")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def browser() -> Any:
    executable = chromium_path()
    if executable is None:
        pytest.skip(f"Chromium is not installed at {CHROMIUM}: install it with {INSTALL_HINT}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright passes --no-sandbox itself (chromium_sandbox defaults to off), which root needs.
        browser = playwright.chromium.launch(executable_path=str(executable), headless=True)
        yield browser
        browser.close()


def written_page(root: Path, build: Any) -> Path:
    """A hand-made results folder (report_helpers) through the real command, as `dvc repro report` runs it."""
    import yaml

    workspace = build(root)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(workspace["params"].to_dict()))
    assert report_main(["--params", str(params_file), "--no-mlflow"]) == 0
    return Path(workspace["params"].report.dir) / "index.html"


@pytest.fixture(scope="module")
def page_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo-shaped results."""
    return written_page(tmp_path_factory.mktemp("browser"), build_demo_report_workspace)


def open_page(browser: Any, path: Path, width: int = 1280) -> tuple[Any, dict[str, list[str]]]:
    """The page loaded at `width` px, and what it logged: console errors and warnings, uncaught exceptions,
    failed requests, requests to anything but the page itself and its data: URIs."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    seen: dict[str, list[str]] = {"console": [], "exceptions": [], "failed": [], "outside": []}
    page.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: seen["exceptions"].append(str(e)))
    page.on("requestfailed", lambda r: seen["failed"].append(f"{r.url[:80]} {r.failure}"))
    page.on("request", lambda r: seen["outside"].append(r.url[:80])
            if not (r.url.startswith("data:") or r.url == path.as_uri()) else None)
    page.goto(path.as_uri(), wait_until="load")
    return page, seen


def test_the_report_renders_without_errors_or_missing_images(browser: Any, page_file: Path) -> None:
    page, seen = open_page(browser, page_file)
    try:
        assert seen == {"console": [], "exceptions": [], "failed": [], "outside": []}
        images = page.evaluate("""Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
            natural: i.naturalWidth, shown: i.getBoundingClientRect().width}))""")
        assert len(images) == 2  # accuracy against shots, matched comparisons
        for image in images:
            assert image["complete"] and image["natural"] > 300, image  # decoded, not a broken-image icon
            assert image["shown"] > 300, image
        # Sections in order, each with content and none saying it has no data.
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => [h.id, h.innerText])")
        assert [h[0] for h in headings] == ["accuracy", "published", "domain", "words", "sweep"]
        for section in ("accuracy", "domain", "words", "sweep"):
            assert page.locator(f"#{section} ~ *").first.is_visible()
        # Nothing wider than the window: wide tables scroll inside their own box.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        # The 16-shot table as rendered text: a mean ± std with its CI line below, per dataset and the average.
        first = page.locator("table.paper").first
        header = first.locator("th").all_inner_texts()
        assert header == ["method", "WorldPastel", "WorldPastelRare", "WorldSketch", "Average (3 datasets)"]
        assert "CI ±" in first.locator("tr.selected td").nth(1).inner_text()
    finally:
        page.close()


def test_the_folded_tables_open(browser: Any, page_file: Path) -> None:
    page, seen = open_page(browser, page_file)
    try:
        folded = page.locator("details")
        assert folded.count() >= 2
        for i in range(folded.count()):
            folded.nth(i).locator("summary").click()
            assert folded.nth(i).locator("table").first.is_visible()
        assert seen["console"] == [] and seen["exceptions"] == []
    finally:
        page.close()


def test_a_narrow_window_scrolls_tables_not_the_page(browser: Any, page_file: Path) -> None:
    page, _ = open_page(browser, page_file, width=700)
    try:
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        widths = page.evaluate("Array.from(document.images).map(i => i.getBoundingClientRect().width)")
        assert all(0 < w <= 700 for w in widths)  # figures shrink to the column
    finally:
        page.close()


def test_base_to_new_and_transfer_sections_render(browser: Any, tmp_path: Path) -> None:
    """A sweep with base-to-new and cross-dataset trials of two methods: the two sections, in order, without
    errors, their tables inside the window (the wide published transfer table scrolls in its box)."""
    path = written_page(tmp_path, build_protocols_workspace)
    page, seen = open_page(browser, path)
    try:
        assert seen == {"console": [], "exceptions": [], "failed": [], "outside": []}
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.id)")
        assert headings == ["accuracy", "published", "base2new", "transfer", "domain", "words", "sweep"]
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        first = page.locator("#base2new ~ div.scroll table.b2n").first
        assert first.locator("th").all_inner_texts() == ["dataset", "method", "selected configuration", "Base", "New",
                                                         "H"]
        assert "CI ±" in first.locator("tbody tr").first.locator("td").nth(3).inner_text()
    finally:
        page.close()
