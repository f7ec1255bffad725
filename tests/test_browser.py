"""The page in a real browser: Debian's Chromium driven by Playwright, against a real
`histosearch serve` process. HISTOSEARCH_SCREENSHOTS=docs saves the README's screenshots."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from data_paths import LC, TCGA

from histosearch.bench.serve import free_port, running_server
from histosearch.cli.common import percentile_ordinal

if TYPE_CHECKING:
    from fastapi import FastAPI
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does it)",
)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = os.environ.get("HISTOSEARCH_SCREENSHOTS")
    return Path(folder) if folder else tmp_path


def launch(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
    )


def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """The served page in a new tab, and the list its script errors are collected in."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page, errors


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
            page, errors = open_page(browser, url)
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
            # percentiles written one way, "53rd percentile", and explained on the page
            for card, hit in zip(
                results.all_inner_texts(),
                page.evaluate("window.histosearch.response.results"),
                strict=True,
            ):
                assert f"{percentile_ordinal(hit['percentile'])} percentile" in card and "%" in card
            assert "nearest other entry" in results.first.locator(".pct").get_attribute("title")
            assert "nearest other entry" in page.inner_text("#percentile-help")
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
            # one absolute scale, cosine 0 to 1, with its colour bar: the slide's least similar
            # tile is drawn in that cosine's colour, not in the darkest one (a min-max stretch)
            assert page.locator("#heat-legend").is_visible()
            assert "linear-gradient" in page.locator("#heat-legend .bar").get_attribute("style")
            ticks = page.locator("#heat-legend .ticks span").all_inner_texts()
            assert ticks[0] == "0" and ticks[-1] == "1"
            low, colour, darkest = page.evaluate(
                """async () => {
                const s = window.histosearch;
                const path = `/api/queries/${s.response.query_id}/heatmap/${s.selected.slide_id}`;
                const heat = await (await fetch(path)).json();
                const low = heat.tiles.reduce((a, b) => (b.cosine < a.cosine ? b : a));
                const col = Math.round(low.x / heat.tile_size);
                const row = Math.round(low.y / heat.tile_size);
                const canvas = document.querySelector("#viewer-result canvas.heatmap");
                const pixel = canvas.getContext("2d").getImageData(col, row, 1, 1).data;
                return [low.cosine, [...pixel.slice(0, 3)], heatColour(0)];
                }"""
            )
            assert 0.05 < low < 0.95 and colour != darkest
            assert colour == page.evaluate(f"heatColour({low})")
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
            # a clicked patch result opens beside the query: the patch image, numbered 1 as
            # the query it matches
            hit = page.evaluate("window.histosearch.response.results[1]")
            figures.nth(1).click()
            opened = page.locator("#result-gallery figure.opened img")
            opened.wait_for(timeout=10_000)
            page.wait_for_function(
                "document.querySelector('#result-gallery figure.opened img').naturalWidth > 0"
            )
            assert opened.get_attribute("src").endswith(
                f"/api/slides/{hit['slide_id']}/patches/{hit['row']}.jpeg"
            )
            assert hit["patch"] in page.inner_text("#result-title")
            assert page.inner_text("#result-gallery figcaption").startswith("1. ")
            assert page.inner_text("#query-gallery figcaption") == f"1. {patch.name}"
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
        browser = launch(playwright)
        try:
            page, errors = open_page(browser, url)
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


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn in this process, on a free local port: its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_the_page_while_the_encoder_loads_and_after(
    served_archive: Path, monkeypatch: pytest.MonkeyPatch, screenshots: Path
) -> None:
    """The server answers while its encoder builds in the background, the first upload says
    "loading the model" and is answered by that one build; then the slide filter box, an
    upload's resolution, both sides of a patch group's pairs numbered, and a one-tile region
    that is searched as a patch, saying so."""
    from playwright.sync_api import sync_playwright

    import histosearch.encoders as encoders
    from histosearch.server.app import create_app

    real = encoders.create_encoder
    let_build = threading.Event()
    builds: list[str] = []

    def held_back(name: str, weights: object = None) -> object:  # the real one, when let
        builds.append(threading.current_thread().name)
        assert let_build.wait(180)
        return real(name, weights)

    monkeypatch.setattr(encoders, "create_encoder", held_back)
    app = create_app(served_archive)
    with serving(app) as url, sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page, errors = open_page(browser, url)
            page.wait_for_selector("#slide-list li")
            assert httpx.get(f"{url}/api/health").json()["model"] == "loading"

            # the slide list filtered by what is typed (name, label, group, metadata)
            slides = httpx.get(f"{url}/api/slides").json()["slides"]
            wanted = sorted(s["name"] for s in slides if "lung_n" in f"{s['name']} {s['label']}")
            assert 0 < len(wanted) < len(slides)
            page.fill("#slide-filter", "LUNG_N")
            shown = page.locator("#slide-list li:not([hidden]) .name")
            assert sorted(shown.all_inner_texts()) == wanted
            assert page.inner_text("#slide-count") == f"{len(wanted)} of {len(slides)}"
            page.fill("#slide-filter", "")
            assert shown.count() == len(slides)

            # the first upload while the encoder builds: "loading the model", then answered
            patch = next((LC / "images" / "lung_n").glob("*.jpeg"))
            page.set_input_files("#upload-file", str(patch))
            page.click("#upload-form button")
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('loading the model')"
            )
            let_build.set()
            page.wait_for_selector("#patch-results figure", timeout=180_000)
            assert httpx.get(f"{url}/api/health").json()["model"] == "ready"
            assert builds == ["histosearch-warm-encoder"]  # built at start-up, not by the search

            # a slide that records no resolution: refused naming the page's fields, then
            # searched with the magnification given in them; the encoder is not built again
            page.set_input_files("#upload-file", str(TCGA))
            page.click("#upload-form button")
            page.wait_for_selector("#status.error", timeout=60_000)
            refusal = page.inner_text("#status")
            assert TCGA.name in refusal and "mpp or magnification field" in refusal
            assert "--" not in refusal
            page.fill("#upload-magnification", "20")
            page.click("#upload-form button")
            page.wait_for_function(
                "window.histosearch.response && window.histosearch.response.query.name"
                f" === {json.dumps(TCGA.name)}",
                timeout=120_000,
            )
            assert page.evaluate("window.histosearch.response.query.patches") > 1
            assert builds == ["histosearch-warm-encoder"]

            # a patch group searched whole, a patch group result opened: its pairs numbered
            # alike on both sides (query patch n <-> matched patch n)
            group = next(s for s in slides if not s["viewable"])
            page.locator("#slide-list li", has_text=group["name"]).click()
            page.click("#btn-whole")
            page.wait_for_function(
                "window.histosearch.response.query.slide_id === " + str(group["id"]),
                timeout=60_000,
            )
            results = page.evaluate("window.histosearch.response.results")
            rank = next(i for i, hit in enumerate(results) if not hit["viewable"])
            page.locator("#slide-results li").nth(rank).click()
            page.wait_for_function("document.body.dataset.queryNumbers > 1")
            pairs = sorted(enumerate(results[rank]["matches"]), key=lambda p: -p[1]["cosine"])
            pairs = pairs[:12]
            query_side = page.locator("#query-gallery figcaption").all_inner_texts()
            result_side = page.locator("#result-gallery figcaption").all_inner_texts()
            assert query_side == [f"{n}. patch {tile + 1}" for n, (tile, _) in enumerate(pairs, 1)]
            assert result_side == [
                f"{n}. cosine {pair['cosine']:.3f}" for n, (_, pair) in enumerate(pairs, 1)
            ]
            sources = page.locator("#query-gallery img").evaluate_all("e => e.map(i => i.src)")
            assert [s.split("/api/")[1] for s in sources] == [
                f"slides/{group['id']}/patches/{tile}.jpeg" for tile, _ in pairs
            ]
            page.wait_for_timeout(300)
            page.screenshot(path=str(screenshots / "serve-numbered-patches.png"))

            # a region of one tile becomes a patch search, and the page says so
            cmu = next(s for s in slides if s["name"] == "cmu-1-small-region.svs")
            page.locator("#slide-list li", has_text=cmu["name"]).click()
            page.wait_for_function("window.histosearch.current.width > 0", timeout=60_000)
            page.click("#btn-whole")
            page.wait_for_function(
                f"window.histosearch.response.query.slide_id === {cmu['id']}", timeout=60_000
            )
            assert page.locator("#notice").is_hidden()
            tile = page.evaluate("window.histosearch.response.results[0].matches[0].query")
            region = [tile["x"], tile["y"], round(tile["size"]), round(tile["size"])]
            page.evaluate(f"searchSlide({json.dumps(region)})")
            page.wait_for_selector("#notice:not([hidden])", timeout=60_000)
            response = page.evaluate("window.histosearch.response")
            assert response["mode"] == "patches" and response["query"]["patches"] == 1
            assert "one tile" in response["note"] and page.inner_text("#notice") == response["note"]
            assert page.locator("#patch-results figure").count() == 5
            # its patch results open on their slide, the pair numbered 1 on both
            page.locator("#patch-results figure").first.click()
            page.wait_for_selector("#viewer-result .match-box", timeout=60_000)
            assert page.inner_text("#viewer-result .match-box span") == "1"
            assert page.inner_text("#viewer-query .region-box span") == "1"
            assert errors == []
        finally:
            let_build.set()  # a failure above must not leave the warm-up thread waiting
            browser.close()
