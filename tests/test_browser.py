"""The page in a real browser: Debian's Chromium driven by Playwright, against a real
`histosearch serve` process. HISTOSEARCH_SCREENSHOTS=docs saves the README's screenshots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from data_paths import LC

from histosearch.bench.serve import running_server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does it)",
)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = os.environ.get("HISTOSEARCH_SCREENSHOTS")
    return Path(folder) if folder else tmp_path


def test_region_search_and_side_by_side_view(served_archive: Path, screenshots: Path) -> None:
    from playwright.sync_api import sync_playwright

    with running_server(served_archive) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            # the slide list, then the viewer showing the slide picked in it
            page.locator("#slide-list").get_by_text("cmu-1-small-region.svs").click()
            page.wait_for_function("window.histosearch.tilesLoaded.query > 2", timeout=60_000)
            assert page.locator("#slide-list li").count() == 8
            assert "cmu-1-small-region.svs" in page.inner_text("#query-title")

            # draw a rectangle over the tissue (the slide's left part) with the mouse
            page.click("#btn-draw")
            box = page.locator("#viewer-query").bounding_box()
            x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.15
            page.mouse.move(x, y)
            page.mouse.down()
            page.mouse.move(x + box["width"] * 0.35, y + box["height"] * 0.6, steps=10)
            page.mouse.up()
            page.wait_for_selector("#slide-results li", timeout=120_000)
            region = page.evaluate("window.histosearch.response.query.region")
            assert region[2] > 100 and region[3] > 100
            assert page.locator("#viewer-query .region-box").count() == 1
            results = page.locator("#slide-results li")
            assert results.count() == 5
            assert "cmu-1.ome.tif" in results.first.inner_text()  # the same pixels come first
            assert "%" in results.first.inner_text() and "percentile" in results.first.inner_text()
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshots / "serve-region-search.png"))

            # the top result beside the query, its matched tiles outlined on both slides
            results.first.click()
            page.wait_for_function(
                "document.body.dataset.resultOverlays > 0"
                " && window.histosearch.tilesLoaded.result > 2",
                timeout=60_000,
            )
            matches = page.locator("#viewer-result .match-box").count()
            assert matches > 0 and page.locator("#viewer-query .match-box").count() == matches
            assert page.locator("#viewer-result").is_visible()
            page.click("#btn-heatmap")
            page.wait_for_selector("#viewer-result canvas.heatmap", timeout=30_000)
            assert "heat map" in page.inner_text("#status")
            page.wait_for_timeout(800)
            page.screenshot(path=str(screenshots / "serve-side-by-side.png"))

            # the result's matched tiles downloaded for QuPath: one outline per match
            with page.expect_download() as download:
                page.click("#btn-qupath")
            geojson = json.loads(Path(download.value.path()).read_text())
            assert download.value.suggested_filename.endswith("-matches.geojson")
            assert geojson["type"] == "FeatureCollection"
            assert len(geojson["features"]) >= matches

            # mark it relevant
            results.first.get_by_text("relevant", exact=True).click()
            page.wait_for_selector("#slide-results li .feedback button.chosen", timeout=10_000)

            # an uploaded patch: a gallery of patches with their slide and position
            patch = next((LC / "images" / "lung_aca").glob("*.jpeg"))
            page.set_input_files("#upload-file", str(patch))
            page.click("#upload-form button")
            page.wait_for_selector("#patch-results figure", timeout=120_000)
            figures = page.locator("#patch-results figure")
            assert figures.count() == 5 and page.locator("#slide-results li").count() == 0
            caption = figures.first.inner_text()
            assert "lung_" in caption and ".jpeg" in caption and "%" in caption
            assert page.locator("#query-gallery img").count() == 1  # the uploaded image
            assert errors == []
        finally:
            browser.close()
    assert (screenshots / "serve-side-by-side.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def annotated_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 LC25000 source tiles per class (colour histogram), with an organ, a year and a
    report whose value is HTML with script: it must be shown as text, never run."""
    from data_paths import write_manifest

    from histosearch import Archive, ArchiveSettings

    root = tmp_path_factory.mktemp("annotated")
    manifest = write_manifest(root / "lc.csv", LC, "group", per_class=3)
    settings = ArchiveSettings(encoder="color-histogram", magnification=5.0, tile_size=224)
    with Archive.create(root / "archive", settings) as archive:
        archive.add([manifest], group_by="group")
        names = [r.name for r in archive.slides()]
        table = root / "meta.csv"
        table.write_text(
            "slide,organ,year,report\n"
            + "".join(
                f'{n},lung,{2015 + i},"<img src=x onerror=window.xss=1><script>window.xss=2'
                f'</script>{n}"\n'
                for i, n in enumerate(names)
            )
        )
        archive.annotate(table)
    return root / "archive"


def test_filters_consensus_and_metadata_shown_as_text(
    annotated_archive: Path, screenshots: Path
) -> None:
    from playwright.sync_api import sync_playwright

    with running_server(annotated_archive) as (url, _), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_selector("#filters label[data-column=year] input")
            # controls from the archive's own columns: values for labels, a range for years
            labels = page.locator("#filters label[data-column=label] option")
            assert labels.all_inner_texts() == ["lung_aca", "lung_n", "lung_scc"]
            assert page.locator("#filters label[data-column=year] input").count() == 2
            # the metadata is text in the slide list, and nothing of it ran
            assert "<script>" in page.inner_text("#slide-list")
            query = page.locator("#slide-list li").first
            query.click()
            page.select_option("#filters label[data-column=label] select", ["lung_n", "lung_scc"])
            page.fill("#filters label[data-column=year] input[data-bound=min]", "2016")
            page.click("#btn-whole")
            page.wait_for_selector("#slide-results li", timeout=60_000)
            response = page.evaluate("window.histosearch.response")
            assert response["where"] == ["label in ('lung_n', 'lung_scc')", "year >= 2016"]
            for hit in response["results"]:
                assert (
                    hit["label"] in ("lung_n", "lung_scc") and int(hit["metadata"]["year"]) >= 2016
                )
            consensus = page.inner_text("#consensus")
            assert consensus.startswith(f"consensus of the top {len(response['results'])} on label")
            assert response["consensus"]["majority"] in consensus
            card = page.inner_text("#slide-results li >> nth=0")
            assert "<img src=x onerror=window.xss=1>" in card and "year: " in card
            assert page.evaluate("window.xss") is None
            assert page.locator("#slide-results img[src=x]").count() == 0
            page.wait_for_timeout(300)
            page.screenshot(path=str(screenshots / "serve-filters-consensus.png"))
            assert errors == []
        finally:
            browser.close()
