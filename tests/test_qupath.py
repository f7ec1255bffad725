"""QuPath export of a search: GeoJSON FeatureCollections in each slide's level-0 pixels."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from data_paths import CMU
from PIL import Image, ImageDraw

from histosearch import Archive, ArchiveSettings, Searcher, open_slide, write_qupath
from histosearch.cli import main
from histosearch.tiling import tile_slide

REGION = (500, 700, 1200, 1500)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, ome_tiff: Path):
    """CMU-1 and the same pixels as an OME-TIFF, embedded at 10x (colour histograms)."""
    root = tmp_path_factory.mktemp("qupath") / "archive"
    settings = ArchiveSettings(
        encoder="color-histogram", magnification=10.0, reduction="none", tile_size=224
    )
    with Archive.create(root, settings) as archive:
        archive.add([CMU, ome_tiff])
    with Archive.open(root) as archive:
        yield archive


def read_collection(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert isinstance(properties["name"], str)
        color = properties["classification"]["color"]
        assert len(color) == 3 and all(0 <= c <= 255 for c in color)
        assert all(isinstance(v, float | int) for v in properties["measurements"].values())
    return data["features"]


def box(feature: dict) -> tuple[float, float, float, float]:
    (ring,) = feature["geometry"]["coordinates"]
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def test_a_region_search_exports_the_query_and_each_result_slide(archive, tmp_path: Path):
    result = Searcher(archive).search(str(CMU), k=1, region=REGION)
    (hit,) = result.slides
    assert hit.record.name == "cmu-1.ome.tif"
    out = tmp_path / "matches.geojson"
    written = write_qupath(result, out)
    assert written == [out, tmp_path / "matches-1-cmu-1.ome.tif.geojson"]

    query = read_collection(out)
    region, *tiles = query
    assert region["properties"]["name"] == "query region" and box(region) == REGION
    assert len(tiles) == len(result.query.tiles) > 4
    for number, (feature, tile) in enumerate(zip(tiles, result.query.tiles, strict=True), 1):
        assert feature["properties"]["name"] == f"query {number}"
        assert box(feature) == pytest.approx((tile.x, tile.y, tile.size, tile.size), abs=0.01)
        assert feature["properties"]["classification"]["name"] == "histosearch query"

    matched = read_collection(written[1])
    expected = {}
    for number, match in enumerate(hit.matches, 1):
        expected.setdefault(match.reference_row, []).append((number, match))
    assert len(matched) == len(expected)
    for feature in matched:
        numbers = [int(n) for n in feature["properties"]["name"].removeprefix("match ").split(",")]
        pairs = next(p for p in expected.values() if [n for n, _ in p] == numbers)
        tile = pairs[0][1].reference
        assert box(feature) == pytest.approx((tile.x, tile.y, tile.size, tile.size), abs=0.01)
        measurements = feature["properties"]["measurements"]
        assert measurements["cosine"] == pytest.approx(max(m.cosine for _, m in pairs), abs=1e-4)
        assert measurements["slide similarity"] == pytest.approx(hit.similarity, abs=1e-4)
    # the same pixels (at 20.04x, from the OME-TIFF's 0.499 um/px): most query tiles' best
    # match lies at the same place
    near = [
        abs(m.reference.x - m.query.x) + abs(m.reference.y - m.query.y) < 8 for m in hit.matches
    ]
    assert sum(near) >= len(near) / 2


def test_a_patch_search_exports_each_hit_on_its_slide(archive, tmp_path: Path):
    result = Searcher(archive).search(str(CMU), k=3, mode="patches", region=(448, 896, 448, 448))
    out = tmp_path / "patches.geojson"
    written = write_qupath(result, out)
    assert written[0] == out
    features = {p.name: read_collection(p) for p in written[1:]}
    ranked = [(rank, hit) for rank, hit in enumerate(result.patches, 1)]
    assert sum(len(f) for f in features.values()) == len(ranked)
    for rank, hit in ranked:
        (feature,) = [
            f for fs in features.values() for f in fs if f["properties"]["name"] == f"rank {rank}"
        ]
        tile = hit.tile
        assert box(feature) == pytest.approx((tile.x, tile.y, tile.size, tile.size), abs=0.01)
        assert feature["properties"]["measurements"]["similarity"] == round(hit.similarity, 4)


def test_search_qupath_writes_the_files_from_the_command_line(archive, tmp_path: Path, capsys):
    out = tmp_path / "cli.geojson"
    saved = sys.argv
    sys.argv = ["histosearch", "search", str(CMU), "--archive", str(archive.root), "-k", "1"]
    sys.argv += ["--region", *map(str, REGION), "--geojson", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = saved
    assert done.value.code in (0, None)
    assert f"QuPath: {out}, {tmp_path / 'cli-1-cmu-1.ome.tif.geojson'}" in capsys.readouterr().err
    assert box(read_collection(out)[0]) == REGION
    assert read_collection(tmp_path / "cli-1-cmu-1.ome.tif.geojson")


def test_the_exported_tiles_lie_on_the_slides_tissue(archive, tmp_path: Path):
    """Draws both files on their slides as QuPath shows them (HISTOSEARCH_SCREENSHOTS=docs
    saves the README's picture) and checks that every outline holds tissue, not glass."""
    result = Searcher(archive).search(str(CMU), k=1, region=REGION)
    query_file, match_file = write_qupath(result, tmp_path / "matches.geojson")
    hit = result.slides[0]
    panels = []
    for slide_path, features in [(CMU, query_file), (Path(hit.record.path), match_file)]:
        with open_slide(slide_path) as slide:
            thumb = slide.thumbnail(700)
            scale = thumb.shape[1] / slide.dimensions[0]
        image = Image.fromarray(thumb)
        draw = ImageDraw.Draw(image)
        for feature in read_collection(features):
            x, y, w, h = (v * scale for v in box(feature))
            inside = thumb[int(y) : int(y + h), int(x) : int(x + w)]
            if feature["properties"]["name"] != "query region":
                stained = (inside.min(axis=2) < 200).mean()  # glass is near white
                assert stained > 0.05, feature["properties"]["name"]
            color = tuple(feature["properties"]["classification"]["color"])
            draw.rectangle((x, y, x + w, y + h), outline=color, width=2)
            draw.text((x + 3, y + 2), feature["properties"]["name"], fill=color)
        panels.append(image)
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 10, max(p.height for p in panels)))
    canvas.paste((255, 255, 255), (0, 0, *canvas.size))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + 10, 0))
    folder = Path(os.environ.get("HISTOSEARCH_SCREENSHOTS") or tmp_path)
    canvas.save(folder / "qupath-matches.png")


def test_tile_geojson_holds_the_tissue_tiles(tmp_path: Path):
    saved = sys.argv
    sys.argv = ["histosearch", "tile", str(CMU), "--mag", "10", "--out", str(tmp_path)]
    sys.argv += ["--geojson"]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = saved
    assert done.value.code in (0, None)
    features = read_collection(tmp_path / f"{CMU.name}.tiles.geojson")
    with open_slide(CMU) as slide:
        grid = tile_slide(slide, 10, 224)
    side = 224 * grid.downsample
    assert [box(f) for f in features] == [
        pytest.approx((x, y, side, side), abs=0.01) for x, y in grid.tissue_coords.tolist()
    ]
    fractions = grid.tissue_fraction[grid.is_tissue]
    assert [f["properties"]["measurements"]["tissue fraction"] for f in features] == [
        pytest.approx(v, abs=1e-4) for v in fractions
    ]


def test_the_page_downloads_a_results_qupath_file(archive):
    from fastapi.testclient import TestClient

    from histosearch.search.qupath import match_features
    from histosearch.server.app import create_app

    cmu = next(r for r in archive.slides() if r.name == CMU.name)
    with TestClient(create_app(archive.root)) as client:
        found = client.post("/api/search", json={"slide": cmu.id, "region": list(REGION), "k": 1})
        assert found.status_code == 200, found.text
        body = found.json()
        (hit,) = body["results"]
        response = client.get(f"/api/queries/{body['query_id']}/qupath/{hit['slide_id']}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/geo+json"
    assert 'filename="cmu-1.ome.tif-matches.geojson"' in response.headers["content-disposition"]
    expected = Searcher(archive).search(cmu.id, k=1, region=REGION)
    assert response.json()["features"] == match_features(expected.slides[0])
