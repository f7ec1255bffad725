"""`histosearch serve`: every endpoint and every refusal, on a small real archive, in process
(FastAPI's TestClient) and against a real server process."""

from __future__ import annotations

import csv
import io
import json
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from data_paths import CMU, LC, TARGET, TCGA
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from histosearch.bench.serve import free_port, running_server
from histosearch.cli import app as cli_app
from histosearch.server.app import create_app
from histosearch.server.limits import json_depth
from histosearch.server.tiles import DeepZoom, SlideCache
from histosearch.slide import open_slide


@pytest.fixture(scope="module")
def app(served_archive: Path):
    return create_app(served_archive)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def slides(client: TestClient) -> dict[str, dict]:
    return {s["name"]: s for s in client.get("/api/slides").json()["slides"]}


def jpeg(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def detail(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and "Traceback" not in body["detail"]
    return body["detail"]


def lc_patch(group_in_archive: bool, served_archive: Path) -> Path:
    """An LC25000 patch whose group is (or is not) in the served archive."""
    with (served_archive.parent / "lc25000.csv").open(newline="") as file:
        served = {row["path"] for row in csv.DictReader(file)}
    with (LC / "manifest.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            path = str((LC / row["path"]).resolve())
            if (path in served) == group_in_archive:
                return Path(path)
    raise AssertionError("no such patch")


# -- catalog, images, tiles ----------------------------------------------------------------


def test_health_describes_the_archive(client: TestClient) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert health["slides"] == 8  # 6 LC25000 groups + CMU-1 twice
    assert health["encoder"] == "efficientnet-lite0-imagenet"
    assert health["magnification"] == 5.0 and health["tile_size"] == 224
    assert health["auth"] is False and health["viewer"] is True


def test_health_says_why_the_encoder_could_not_be_built(
    served_archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import histosearch.encoders as encoders
    from histosearch.encoders.names import EncoderError

    def unbuildable(name: str, weights: object = None) -> object:
        raise EncoderError(name, "its weights are not on disk")

    monkeypatch.setattr(encoders, "create_encoder", unbuildable)
    with TestClient(create_app(served_archive)) as client:
        deadline = time.monotonic() + 60  # the background build fails at once
        while (health := client.get("/api/health").json())["model"] == "loading":
            assert time.monotonic() < deadline, "the encoder build never ended"
            time.sleep(0.05)
        assert health["model"] == "failed"
        assert health["model_error"] == "its weights are not on disk"
        # archived slides are still searched; an upload, which needs the encoder, says why not
        archived = client.get("/api/slides").json()["slides"][0]["id"]
        assert client.post("/api/search", json={"slide": archived, "k": 2}).status_code == 200
        patch = next((LC / "images" / "lung_n").glob("*.jpeg"))
        upload = {"file": (patch.name, patch.read_bytes())}
        refusal = detail(client.post("/api/search", files=upload), 400)
        assert refusal == f"{patch.name}: its weights are not on disk"
        # the weights put back: the next upload builds the encoder, and health says so
        monkeypatch.undo()
        assert client.post("/api/search", files=upload).status_code == 200
        health = client.get("/api/health").json()
        assert (health["model"], health["model_error"]) == ("ready", None)


def test_slide_list_pages_and_flags(client: TestClient, slides: dict[str, dict]) -> None:
    page = client.get("/api/slides").json()
    assert page["total"] == 8 and len(page["slides"]) == 8
    assert slides["cmu-1-small-region.svs"]["viewable"] is True
    assert slides["cmu-1.ome.tif"]["viewable"] is True
    groups = [s for s in slides.values() if not s["viewable"]]
    assert len(groups) == 6
    assert {g["label"] for g in groups} == {"lung_aca", "lung_n", "lung_scc"}
    assert all(g["patches"] == 8 for g in groups)
    assert slides["cmu-1-small-region.svs"]["magnification"] == pytest.approx(20, abs=0.2)
    ids = [s["id"] for s in page["slides"]]
    second = client.get("/api/slides?offset=2&limit=3").json()
    assert [s["id"] for s in second["slides"]] == ids[2:5]
    assert second["total"] == 8
    assert client.get("/api/slides?offset=8").json()["slides"] == []


def test_thumbnails_of_a_slide_and_of_a_patch_group(
    client: TestClient, slides: dict[str, dict]
) -> None:
    slide = jpeg(client.get(f"/api/slides/{slides['cmu-1-small-region.svs']['id']}/thumbnail"))
    # CMU-1's region is 2220 x 2967: the longer side shrinks to 256
    assert slide.shape == (256, int(2220 / (2967 / 256)), 3)
    group = next(s for s in slides.values() if not s["viewable"])
    assert jpeg(client.get(f"/api/slides/{group['id']}/thumbnail")).shape == (224, 224, 3)


def test_patch_images(client: TestClient, slides: dict[str, dict], served_archive: Path) -> None:
    group = next(s for s in slides.values() if not s["viewable"])
    pixels = jpeg(client.get(f"/api/slides/{group['id']}/patches/7.jpeg"))
    assert pixels.shape == (224, 224, 3) and pixels.std() > 10  # real tissue, not blank
    cmu = slides["cmu-1-small-region.svs"]
    assert jpeg(client.get(f"/api/slides/{cmu['id']}/patches/0.jpeg")).shape == (224, 224, 3)
    assert "no row 8" in detail(client.get(f"/api/slides/{group['id']}/patches/8.jpeg"), 404)


def test_deep_zoom_of_openslide_and_tiffslide_files_agree(
    client: TestClient, slides: dict[str, dict]
) -> None:
    svs, ome = slides["cmu-1-small-region.svs"]["id"], slides["cmu-1.ome.tif"]["id"]
    for slide_id in (svs, ome):
        response = client.get(f"/slides/{slide_id}.dzi")
        assert response.status_code == 200
        root = ElementTree.fromstring(response.text)
        assert (root.get("TileSize"), root.get("Overlap")) == ("254", "1")
        size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
        assert (size.get("Width"), size.get("Height")) == ("2220", "2967")
    # OpenSlide's DeepZoomGenerator (SVS) and histosearch's own (OME-TIFF, same pixels) cut
    # the same pyramid: equal tile shapes, nearly equal pixels (both JPEG-compressed).
    for level, col, row in [(12, 0, 0), (12, 3, 5), (12, 8, 11), (11, 4, 5), (9, 1, 1), (0, 0, 0)]:
        a = jpeg(client.get(f"/slides/{svs}_files/{level}/{col}_{row}.jpeg"))
        b = jpeg(client.get(f"/slides/{ome}_files/{level}/{col}_{row}.jpeg"))
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 8
    # the last column of the full level: 2220 - 8 * 254 + 1 overlap = 189 px wide
    assert jpeg(client.get(f"/slides/{ome}_files/12/8_0.jpeg")).shape == (255, 189, 3)


def test_deep_zoom_over_a_plain_image_is_its_pixels() -> None:
    with open_slide(TARGET) as image:
        pixels = image.read_scaled((0, 0), image.dimensions, 1.0)
        zoom = DeepZoom(image)
        top = zoom.level_count - 1
        tile = np.asarray(Image.open(io.BytesIO(zoom.tile(top, 0, 0))).convert("RGB"))
    assert tile.shape == (min(255, pixels.shape[0]), min(255, pixels.shape[1]), 3)
    assert np.abs(tile.astype(int) - pixels[:255, :255].astype(int)).mean() < 4


def test_slide_cache_closes_an_evicted_slide_only_after_its_last_reader() -> None:
    cache = SlideCache(capacity=1)
    with cache.use(1, CMU) as first:
        with cache.use(2, TARGET):
            pass
        # evicted by slide 2, still readable while in use
        assert first.slide.read_scaled((0, 0), (8, 8), 1.0).shape == (8, 8, 3)
    with pytest.raises(Exception):  # noqa: B017 - closed: OpenSlide refuses any read
        first.slide.read_scaled((0, 0), (8, 8), 1.0)
    with cache.use(1, CMU) as again:
        assert again is not first and again.slide.dimensions == (2220, 2967)
    cache.close()


def test_tile_and_slide_errors(client: TestClient, slides: dict[str, dict]) -> None:
    svs = slides["cmu-1-small-region.svs"]["id"]
    group = next(s for s in slides.values() if not s["viewable"])["id"]
    assert "outside level 12 (9x12 tiles)" in detail(
        client.get(f"/slides/{svs}_files/12/9_0.jpeg"), 404
    )
    assert "level 13 is outside 0..12" in detail(
        client.get(f"/slides/{svs}_files/13/0_0.jpeg"), 404
    )
    ome = slides["cmu-1.ome.tif"]["id"]
    assert "outside level" in detail(client.get(f"/slides/{ome}_files/12/0_12.jpeg"), 404)
    assert "no slide with id 999" in detail(client.get("/slides/999.dzi"), 404)
    assert "no slide with id 999" in detail(client.get("/api/slides/999/thumbnail"), 404)
    assert "group of patches" in detail(client.get(f"/slides/{group}.dzi"), 404)
    assert "slide_id" in detail(client.get("/slides/abc.dzi"), 422)
    assert "limit" in detail(client.get("/api/slides?limit=0"), 422)


@pytest.mark.parametrize(
    "path",
    [
        "/slides/..%2F..%2F..%2Fetc%2Fpasswd.dzi",
        "/slides/%2e%2e/%2e%2e/etc/passwd",
        "/slides/1_files/..%2F..%2Fcatalog.sqlite",
        "/api/slides/..%2F..%2Fcatalog.sqlite/thumbnail",
        "/static/..%2F..%2F..%2Fcatalog.sqlite",
        "/static/../app.py",
    ],
)
def test_path_traversal_is_not_found(client: TestClient, path: str) -> None:
    detail(client.get(path), 404)


def test_page_and_viewer_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "openseadragon.min.js" in page.text
    script = client.get(
        "/static/node_modules/openseadragon/build/openseadragon/openseadragon.min.js"
    )
    assert script.status_code == 200 and b"OpenSeadragon" in script.content
    icon = client.get("/static/node_modules/openseadragon/build/openseadragon/images/home_rest.png")
    assert icon.status_code == 200 and icon.content[:4] == b"\x89PNG"
    assert client.get("/static/app.js").status_code == 200
    docs = client.get("/openapi.json").json()
    assert "/api/search" in docs["paths"] and "/slides/{slide_id}.dzi" in docs["paths"]
    docs_page = client.get("/docs")  # Swagger UI from npm too, not from a CDN
    assert docs_page.status_code == 200 and "cdn." not in docs_page.text
    bundle = "/static/node_modules/swagger-ui-dist/swagger-ui-bundle.js"
    assert bundle in docs_page.text and client.get(bundle).status_code == 200


# -- search ------------------------------------------------------------------------------------


def test_region_search_finds_the_same_pixels_first(
    client: TestClient, slides: dict[str, dict]
) -> None:
    svs, ome = slides["cmu-1-small-region.svs"], slides["cmu-1.ome.tif"]
    region = [0, 0, 1800, 1800]
    response = client.post("/api/search", json={"slide": svs["id"], "region": region, "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "slides" and len(body["query_id"]) == 32
    query = body["query"]
    assert query["slide_id"] == svs["id"] and query["region"] == region
    assert query["name"] == "cmu-1-small-region.svs"
    assert 0 < query["patches"] < svs["patches"]
    hits = body["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert svs["id"] not in [h["slide_id"] for h in hits]  # its own slide is excluded
    assert hits[0]["slide_id"] == ome["id"] and hits[0]["viewable"] is True
    assert [h["viewable"] for h in hits[1:]] == [False, False]  # LC25000 groups
    assert hits[0]["similarity"] > 0.8 > hits[1]["similarity"]
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    assert all(0 <= h["percentile"] <= 100 for h in hits)
    assert len(hits[0]["matches"]) == query["patches"]
    for match in hits[0]["matches"]:  # only tiles whose centre is inside the box
        tile = match["query"]
        assert tile["x"] + tile["size"] / 2 < 1800 and tile["y"] + tile["size"] / 2 < 1800
    best = max(hits[0]["matches"], key=lambda m: m["cosine"])
    assert best["cosine"] > 0.9
    # the same pixels match the same place (the two files' grids differ by their mpp rounding)
    assert abs(best["query"]["x"] - best["match"]["x"]) < 20
    assert abs(best["query"]["y"] - best["match"]["y"]) < 20
    # a match's row is the matched patch's row in its slide
    group = hits[1]
    row = group["matches"][0]["row"]
    assert 0 <= row < group["patches"]
    assert client.get(f"/api/slides/{group['slide_id']}/patches/{row}.jpeg").status_code == 200


def test_heatmap_of_a_result(client: TestClient, slides: dict[str, dict]) -> None:
    svs, ome = slides["cmu-1-small-region.svs"], slides["cmu-1.ome.tif"]
    body = client.post("/api/search", json={"slide": svs["id"], "k": 2}).json()
    hit = body["results"][0]
    heat = client.get(f"/api/queries/{body['query_id']}/heatmap/{ome['id']}")
    assert heat.status_code == 200, heat.text
    tiles = heat.json()["tiles"]
    assert len(tiles) == ome["patches"] and heat.json()["tile_size"] > 224  # level-0 px at 20x
    assert max(t["cosine"] for t in tiles) == pytest.approx(
        max(m["cosine"] for m in hit["matches"]), abs=2e-3
    )
    other = next(s for s in slides.values() if s["id"] not in {svs["id"], ome["id"]})
    shown = {h["slide_id"] for h in body["results"]}
    if other["id"] not in shown:
        assert "not a slide result" in detail(
            client.get(f"/api/queries/{body['query_id']}/heatmap/{other['id']}"), 404
        )
    assert "no recent query" in detail(client.get(f"/api/queries/{'0' * 32}/heatmap/1"), 404)


def test_upload_of_an_archived_patch_finds_itself(client: TestClient, served_archive: Path) -> None:
    patch = lc_patch(True, served_archive)
    response = client.post(
        "/api/search", files={"file": (patch.name, patch.read_bytes(), "image/jpeg")}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "patches" and body["query"]["name"] == patch.name
    assert body["query"]["slide_id"] is None and body["query"]["patches"] == 1
    top = body["results"][0]
    assert top["patch"] == patch.name and top["similarity"] > 0.99
    assert "path" not in top  # no server file path is given out
    image = jpeg(client.get(f"/api/slides/{top['slide_id']}/patches/{top['row']}.jpeg"))
    assert np.abs(image.astype(int) - np.asarray(Image.open(patch).convert("RGB"))).mean() < 6


def test_upload_of_a_slide_file_with_options(client: TestClient, slides: dict[str, dict]) -> None:
    response = client.post(
        "/api/search",
        files={"file": ("query.svs", CMU.read_bytes())},
        data={"k": "2", "mode": "slides"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["name"] == "query.svs"
    hits = body["results"]
    assert len(hits) == 2
    assert {h["slide_id"] for h in hits} == {
        slides["cmu-1-small-region.svs"]["id"],
        slides["cmu-1.ome.tif"]["id"],
    }
    assert hits[1]["similarity"] > 0.8


def test_an_upload_without_resolution_takes_it_from_the_form(client: TestClient) -> None:
    upload = {"file": ("frozen.svs", TCGA.read_bytes())}  # records neither mpp nor power
    refusal = detail(client.post("/api/search", files=upload), 400)
    assert refusal.startswith("frozen.svs: ") and "mpp or magnification field" in refusal
    assert "--" not in refusal  # no command-line flag named to a page's user
    assert "mpp" in detail(client.post("/api/search", files=upload, data={"mpp": "0"}), 422)
    by_power = client.post("/api/search", files=upload, data={"magnification": "20"})
    by_mpp = client.post("/api/search", files=upload, data={"mpp": "0.5"})  # 20x: 10 / 20
    assert by_power.status_code == 200 and by_mpp.status_code == 200, by_power.text
    tiles = by_power.json()["query"]["patches"]
    assert tiles > 1 and by_mpp.json()["query"]["patches"] == tiles


def test_uploads_leave_no_temporary_file(
    client: TestClient, served_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    patch = lc_patch(False, served_archive)
    ok = client.post("/api/search", files={"file": (patch.name, patch.read_bytes())})
    bad = client.post("/api/search", files={"file": ("x.png", b"not a png")})
    assert ok.status_code == 200 and bad.status_code == 400
    assert list(tmp_path.iterdir()) == []


def test_concurrent_queries_get_the_answers_of_serial_ones(
    client: TestClient, slides: dict[str, dict], served_archive: Path
) -> None:
    svs = slides["cmu-1-small-region.svs"]["id"]
    patch = lc_patch(False, served_archive).read_bytes()
    queries = (
        [
            {"json": {"slide": svs, "region": [0, 0, 900 * (1 + i % 3), 2967], "k": 4}}
            for i in range(4)
        ]
        + [{"json": {"slide": s["id"], "k": 3}} for s in list(slides.values())[:2]]
        + [{"files": {"file": ("p.jpeg", patch)}, "data": {"k": "4"}}] * 2
    )

    def run(query: dict) -> list:
        response = client.post("/api/search", **query)
        assert response.status_code == 200, response.text
        return [(h["slide_id"], h["similarity"]) for h in response.json()["results"]]

    serial = [run(q) for q in queries]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, queries))
    assert concurrent == serial


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"slide": 999}, 404, "no slide with id 999"),
        ({"slide": "x"}, 422, "slide"),
        ({"slide": True}, 422, "expected an integer number"),  # lax validation read it as 1
        ({"slide": "1"}, 422, "expected an integer number"),
        ({"k": 5}, 422, "slide: Field required"),
        ({"slide": 7, "k": 0}, 422, "k:"),
        ({"slide": 7, "mode": "best"}, 422, "mode:"),
        ({"slide": 7, "exclude": ["hospital"]}, 422, "exclude"),
        ({"slide": 7, "region": [0, 0, 10]}, 422, "region"),
        ({"slide": 7, "region": [0, 0, -5, 10]}, 422, "region"),
        ({"slide": 7, "path": "/etc/passwd"}, 422, "path: Extra inputs"),
    ],
)
def test_malformed_queries(client: TestClient, slides, body: dict, status: int, words: str) -> None:
    if body.get("slide") == 7:
        body = {**body, "slide": slides["cmu-1-small-region.svs"]["id"]}
    assert words in detail(client.post("/api/search", json=body), status)


def test_search_refusals(client: TestClient, slides: dict[str, dict]) -> None:
    svs = slides["cmu-1-small-region.svs"]["id"]
    outside = client.post("/api/search", json={"slide": svs, "region": [50000, 50000, 10, 10]})
    detail(outside, 400)
    broken = client.post(
        "/api/search", content=b'{"slide": 1,', headers={"content-type": "application/json"}
    )
    assert "malformed JSON" in detail(broken, 400)
    assert "multipart" in detail(client.post("/api/search", content=b"slide=1"), 415)


@pytest.mark.parametrize(
    ("name", "content", "status", "words"),
    [
        ("notes.txt", b"hello", 415, "not an image or slide file"),
        ("patch.png", b"\x89PNG\r\n\x1a\n garbage", 400, "not a readable image"),
        ("patch.jpeg", b"", 400, "empty"),
        ("scan.svs", b"II*\x00 this is no slide", 400, "not a readable slide"),
    ],
)
def test_unreadable_uploads(
    client: TestClient, name: str, content: bytes, status: int, words: str
) -> None:
    response = client.post("/api/search", files={"file": (name, content)})
    message = detail(response, status)
    assert words in message and name in message and "/tmp" not in message


def test_upload_without_a_file_part(client: TestClient) -> None:
    response = client.post("/api/search", data={"k": "3"}, files={"image": ("a.png", b"x")})
    assert "no `file` part" in detail(response, 400)


def test_decompression_bomb_is_refused(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")  # 144 Mpx in a small file
    assert len(buffer.getvalue()) < 1 << 20
    response = client.post("/api/search", files={"file": ("bomb.png", buffer.getvalue())})
    assert "pixel" in detail(response, 413)


def test_upload_over_the_byte_cap(app, client: TestClient) -> None:
    state = app.state.server
    saved, state.max_upload_bytes = state.max_upload_bytes, 1 << 20
    try:
        big = CMU.read_bytes()  # 1.8 MB
        assert len(big) > 1 << 20
        response = client.post("/api/search", files={"file": ("big.svs", big)})
        assert "exceeds the 1 MB limit" in detail(response, 413)

        def chunks():  # no Content-Length: the cap is counted while streaming
            yield b"--b\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"
            for _ in range(40):
                yield b"\0" * 65536

        streamed = client.post(
            "/api/search",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert "exceeds the 1 MB limit" in detail(streamed, 413)
    finally:
        state.max_upload_bytes = saved
    assert client.get("/api/health").status_code == 200


def test_an_unexpected_error_is_a_500_without_traceback(app, slides: dict[str, dict]) -> None:
    state = app.state.server
    real = state.searcher

    class Broken:
        encoder_ready = True  # what /api/health asks

        def search(self, *args, **kwargs):
            raise RuntimeError("disk on fire at /secret/path")

    state.searcher = Broken()
    try:
        # not entered as a context: leaving it would run the shutdown of the shared app
        client = TestClient(app, raise_server_exceptions=False)
        body = {"slide": slides["cmu-1-small-region.svs"]["id"]}
        message = detail(client.post("/api/search", json=body), 500)
        assert "RuntimeError" in message and "/secret" not in message
        state.searcher = real
        assert client.post("/api/search", json=body).status_code == 200
    finally:
        state.searcher = real


def test_bearer_token_guards_api_and_tiles(app, client: TestClient, slides) -> None:
    state = app.state.server
    state.token = "s3cret"
    svs = slides["cmu-1-small-region.svs"]["id"]
    try:
        for path in (
            "/api/health",
            "/api/slides",
            f"/slides/{svs}.dzi",
            f"/slides/{svs}_files/0/0_0.jpeg",
        ):
            response = client.get(path)
            assert "bearer token" in detail(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/api/search", json={"slide": svs}).status_code == 401
        assert client.get("/").status_code == 200  # the page asks for the token
    finally:
        state.token = None


# -- malformed ids and bodies: 4xx, never 5xx, and the connection kept --------------------------

JSON = {"content-type": "application/json"}
DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError for any recursive parser
ID_ROUTES = [
    "/api/slides/{}/thumbnail",
    "/api/slides/{}/patches/0.jpeg",
    "/slides/{}.dzi",
    "/slides/{}_files/0/0_0.jpeg",
    "/api/queries/" + "0" * 32 + "/heatmap/{}",
    "/api/queries/" + "0" * 32 + "/qupath/{}",
]


def mark_of(body: dict, slide: dict, **changes) -> dict:
    """A feedback mark on the first result of the search answered with `body`."""
    mark = {
        "query_id": body["query_id"],
        "query_slide": slide["id"],
        "query_name": slide["name"],
        "mode": body["mode"],
        "result_slide": body["results"][0]["slide_id"],
        "similarity": body["results"][0]["similarity"],
        "relevant": True,
    }
    return {**mark, **changes}


@pytest.mark.parametrize("slide_id", [2**63, 2**53])
@pytest.mark.parametrize("route", ID_ROUTES)
def test_an_id_past_the_integer_range_is_invalid(
    client: TestClient, route: str, slide_id: int
) -> None:
    message = detail(client.get(route.format(slide_id)), 422)
    assert message == f"slide_id: Input should be less than or equal to {2**53 - 1}"


@pytest.mark.parametrize("field", ["slide", "result_slide", "query_slide", "result_row"])
def test_a_json_id_past_the_integer_range_is_invalid(
    client: TestClient, slides: dict[str, dict], field: str
) -> None:
    svs = slides["cmu-1-small-region.svs"]
    route, body = ("/api/search", {"slide": svs["id"]})
    if field != "slide":
        route, body = "/api/feedback", {"query_name": "q", "mode": "slides", "relevant": True}
        body["result_slide"] = svs["id"]
    message = detail(client.post(route, json={**body, field: 2**63}), 422)
    assert message.startswith(f"{field}: Input should be less than or equal to {2**53 - 1}")


def test_the_schema_bounds_every_id(client: TestClient) -> None:
    docs = client.get("/openapi.json").json()
    bound = {"type": "integer", "minimum": 0, "maximum": 2**53 - 1, "title": "Slide Id"}
    slide_ids = [
        parameter["schema"]
        for methods in docs["paths"].values()
        for parameter in methods.get("get", {}).get("parameters", [])
        if parameter["name"] == "slide_id"
    ]
    assert slide_ids == [bound] * len(ID_ROUTES)
    search = docs["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert search["application/json"]["schema"]["properties"]["slide"]["maximum"] == 2**53 - 1
    feedback = docs["components"]["schemas"]["FeedbackIn"]["properties"]
    for field in ("query_slide", "result_slide", "result_row"):
        assert {"maximum": 2**53 - 1, "minimum": 0, "type": "integer"}.items() <= (
            feedback[field].get("anyOf", [feedback[field]])[0].items()
        )


@pytest.mark.parametrize("route", ["/api/search", "/api/feedback"])
@pytest.mark.parametrize("headers", [JSON, {}], ids=["json", "no content type"])
def test_json_nested_too_deep_is_refused_before_parsing(
    client: TestClient, route: str, headers: dict
) -> None:
    response = client.post(route, content=DEEP, headers=headers)
    assert detail(response, 400) == "JSON nested deeper than 32 levels is refused"


def test_the_depth_limit_is_32_levels(client: TestClient, slides: dict[str, dict]) -> None:
    svs = slides["cmu-1-small-region.svs"]["id"]

    def nested(levels: int) -> str:  # the object, then `levels - 1` arrays around a string
        return f'{{"slide": {svs}, "where": {"[" * (levels - 1)}"x"{"]" * (levels - 1)}}}'

    assert "where" in detail(client.post("/api/search", content=nested(32), headers=JSON), 422)
    assert "32 levels" in detail(client.post("/api/search", content=nested(33), headers=JSON), 400)


def test_json_depth_skips_strings_and_stays_linear() -> None:
    assert json_depth(b'{"a": "[[[[{{", "b": ["\\"]]]", {"c": 1}]}') == 3
    assert json_depth(b"17") == 0 and json_depth(b"[[[") == 3
    hostile = b'["' + b'\\"[' * 300_000 + b'"]'  # one string of escaped quotes and brackets
    started = time.perf_counter()
    assert json_depth(hostile) == 1 and json_depth(b"[" * 1_000_000) == 1_000_000
    assert time.perf_counter() - started < 2


def test_the_schema_declares_every_error_as_sent(client: TestClient) -> None:
    docs = client.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorBody"}
    statuses = set()
    for route, methods in docs["paths"].items():
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                if status >= "400":
                    statuses.add(status)
                    assert response["content"]["application/json"]["schema"] == error, (
                        route,
                        method,
                        status,
                    )
    assert statuses == {"400", "401", "404", "413", "415", "422"}
    assert "HTTPValidationError" not in docs["components"]["schemas"]
    assert docs["components"]["schemas"]["ErrorBody"]["properties"] == {
        "detail": {"title": "Detail", "type": "string"}
    }
    response = client.get("/api/slides?limit=0")  # a 422 as sent: {"detail": "..."}
    assert response.json() == {"detail": "limit: Input should be greater than or equal to 1"}


def test_the_upload_form_in_the_schema_is_what_the_server_validates(client: TestClient) -> None:
    docs = client.get("/openapi.json").json()
    content = docs["paths"]["/api/search"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["additionalProperties"] is False
    assert form["properties"]["k"]["minimum"] == 1 and form["properties"]["k"]["maximum"] == 100
    assert form["properties"]["exclude"]["type"] == "array"  # a form has no null
    options = set(content["application/json"]["schema"]["properties"]) - {"slide", "region"}
    assert set(form["properties"]) == {"file", "mpp", "magnification"} | options
    assert form["properties"]["mpp"]["exclusiveMinimum"] == 0


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1.5", "-0.1"])
def test_feedback_refuses_a_similarity_outside_0_to_1(
    client: TestClient, slides: dict[str, dict], value: str
) -> None:
    svs = slides["cmu-1-small-region.svs"]
    mark = mark_of(client.post("/api/search", json={"slide": svs["id"], "k": 3}).json(), svs)
    text = json.dumps({**mark, "similarity": None}).replace("null", value)
    response = client.post("/api/feedback", content=text, headers=JSON)
    assert detail(response, 422).startswith("similarity: Input should be")


def test_feedback_refuses_a_query_the_server_did_not_issue(
    client: TestClient, slides: dict[str, dict]
) -> None:
    svs, ome = slides["cmu-1-small-region.svs"], slides["cmu-1.ome.tif"]
    body = client.post("/api/search", json={"slide": svs["id"], "k": 2}).json()
    assert body["results"][0]["slide_id"] == ome["id"]

    def refused(status: int, **changes) -> str:
        return detail(client.post("/api/feedback", json=mark_of(body, svs, **changes)), status)

    assert "was not issued by this server" in refused(404, query_id="0" * 32)
    assert "query_id: String should match pattern" in refused(422, query_id="nope")
    outside = next(
        s for s in slides.values() if s["id"] not in {r["slide_id"] for r in body["results"]}
    )
    assert f"slide {outside['id']} is not a result of query" in refused(
        400, result_slide=outside["id"]
    )
    assert f"searched slide {svs['id']} in mode slides" in refused(400, query_slide=ome["id"])
    assert "in mode slides, not slide" in refused(400, mode="patches")
    response = client.post("/api/feedback", json=mark_of(body, svs))
    assert response.status_code == 201, response.text


def _note_socket(response: httpx.Response) -> None:
    """Keep the client's side of the connection a response came on (before it may close)."""
    stream = response.extensions["network_stream"]
    response.extensions["socket"] = stream.get_extra_info("client_addr")


@pytest.fixture(scope="module")
def http(app) -> Iterator[httpx.Client]:
    """One keep-alive client of `app` served by uvicorn on a free local port (lifespan off:
    the module's other tests share the app and its archive)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    hooks = {"response": [_note_socket]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, event_hooks=hooks) as client:
        yield client
    server.should_exit = True
    thread.join(timeout=30)


def assert_same_connection_after(http: httpx.Client, bad: Callable[[], httpx.Response]) -> int:
    """Send a good request, the bad one and a good one: the connection outlives the bad one
    unless it said `Connection: close`. Returns the bad one's status."""
    before = http.get("/api/health")
    refused = bad()
    after = http.get("/api/health")
    assert before.status_code == after.status_code == 200
    if refused.headers.get("connection") == "close":
        assert after.extensions["socket"] != refused.extensions["socket"]
    else:
        assert before.extensions["socket"] == refused.extensions["socket"]
        assert after.extensions["socket"] == refused.extensions["socket"]
    return refused.status_code


@pytest.mark.parametrize(
    ("request_args", "status"),
    [
        ({"method": "GET", "url": f"/api/slides/{2**63}/thumbnail"}, 422),
        ({"method": "GET", "url": f"/slides/{2**63}_files/0/0_0.jpeg"}, 422),
        ({"method": "POST", "url": "/api/search", "json": {"slide": 2**63}}, 422),
        ({"method": "POST", "url": "/api/search", "content": DEEP, "headers": JSON}, 400),
        ({"method": "POST", "url": "/api/feedback", "content": DEEP, "headers": JSON}, 400),
        ({"method": "POST", "url": "/api/search", "content": b'{"slide":', "headers": JSON}, 400),
        (
            {"method": "POST", "url": "/api/search", "content": b"[" + b" " * (2 << 20) + b"]"},
            413,
        ),
    ],
    ids=["thumbnail id", "tile id", "JSON id", "deep search", "deep feedback", "broken", "2 MB"],
)
def test_a_refused_request_keeps_the_connection(
    http: httpx.Client, request_args: dict, status: int
) -> None:
    assert assert_same_connection_after(http, lambda: http.request(**request_args)) == status


def test_an_unexpected_error_keeps_the_connection(
    app, http: httpx.Client, slides: dict[str, dict]
) -> None:
    state = app.state.server
    real = state.searcher

    class Broken:
        encoder_ready = True  # what /api/health asks

        def search(self, *args, **kwargs):
            raise RuntimeError("disk on fire")

    state.searcher = Broken()
    try:
        body = {"slide": slides["cmu-1-small-region.svs"]["id"]}
        assert (
            assert_same_connection_after(http, lambda: http.post("/api/search", json=body)) == 500
        )
    finally:
        state.searcher = real


# -- feedback --------------------------------------------------------------------------------------


def test_feedback_is_stored_and_exported(
    client: TestClient, slides: dict[str, dict], served_archive: Path, tmp_path: Path
) -> None:
    svs, ome = slides["cmu-1-small-region.svs"], slides["cmu-1.ome.tif"]
    query = {"slide": svs["id"], "region": [0, 0, 1800, 1800]}
    body = client.post("/api/search", json=query).json()
    marks = [(ome["id"], True), (body["results"][1]["slide_id"], False)]
    for slide_id, relevant in marks:
        response = client.post(
            "/api/feedback",
            json={
                "query_id": body["query_id"],
                "query_slide": svs["id"],
                "query_name": svs["name"],
                "region": [0, 0, 1800, 1800],
                "mode": "slides",
                "result_slide": slide_id,
                "similarity": 0.5,
                "relevant": relevant,
            },
        )
        assert response.status_code == 201 and response.json()["id"] > 0
    unknown = {"query_name": "q", "mode": "slides", "result_slide": 999, "relevant": True}
    assert "no slide with id 999" in detail(client.post("/api/feedback", json=unknown), 404)
    assert "relevant" in detail(
        client.post("/api/feedback", json={**unknown, "relevant": None}), 422
    )
    out = tmp_path / "marks.csv"
    result = CliRunner().invoke(
        cli_app, ["feedback", "--archive", str(served_archive), "--csv", str(out)]
    )
    assert result.exit_code == 0, result.output
    with out.open(newline="") as file:
        rows = [r for r in csv.DictReader(file) if r["query_id"] == body["query_id"]]
    assert [(int(r["result_slide"]), r["relevant"]) for r in rows] == [
        (slide_id, str(relevant)) for slide_id, relevant in marks
    ]
    assert rows[0]["result_name"] == "cmu-1.ome.tif" and rows[0]["region"] == "[0, 0, 1800, 1800]"


# -- a real server process ---------------------------------------------------------------------


def test_a_real_server_process(served_archive: Path, slides: dict[str, dict]) -> None:
    svs = slides["cmu-1-small-region.svs"]["id"]
    token = {"Authorization": "Bearer t0ken"}
    options = ("--token", "t0ken", "--max-upload-mb", "1")
    with (
        running_server(served_archive, *options) as (url, _),
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        assert http.get("/api/health").status_code == 401
        assert http.get("/api/health", headers=token).json()["slides"] == 8
        found = http.post("/api/search", json={"slide": svs, "k": 2}, headers=token)
        assert found.status_code == 200 and found.json()["results"][0]["similarity"] > 0.8
        tile = http.get(f"/slides/{svs}_files/12/0_0.jpeg", headers=token)
        assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
        big = http.post("/api/search", files={"file": ("big.svs", CMU.read_bytes())}, headers=token)
        assert big.status_code == 413 and "1 MB" in big.json()["detail"]
        assert http.get("/slides/..%2F..%2Fetc%2Fpasswd.dzi", headers=token).status_code == 404
        assert http.get("/api/health", headers=token).status_code == 200  # still serving


def test_serve_refuses_a_public_bind_without_token(served_archive: Path) -> None:
    result = CliRunner().invoke(
        cli_app, ["serve", "--archive", str(served_archive), "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without --token" in result.output


def test_coarse_levels_cut_from_the_overview_match_direct_reads() -> None:
    with open_slide(CMU) as slide:
        zoom = DeepZoom(slide)
        for level in (10, 8, 0):  # 555 x 742, 139 x 186 and 1 x 1 px: from the overview
            assert max(zoom.level_dimensions[level]) <= 1024
            cut = np.asarray(Image.open(io.BytesIO(zoom.tile(level, 0, 0))).convert("RGB"))
            read = zoom._read(level, zoom.bounds(level, 0, 0))
            assert cut.shape == read.shape
            assert np.abs(cut.astype(int) - read.astype(int)).mean() < 6
