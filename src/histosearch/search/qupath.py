"""A search's matched regions as QuPath GeoJSON: one FeatureCollection per slide, in that
slide's level-0 pixels (QuPath's own coordinates), to drop onto the slide open in QuPath
(File > Import objects from file, or drag and drop).

Every tile is a square Polygon annotation with QuPath's properties: `objectType`, a `name`,
a `classification` (name and colour) and `measurements`. The query's file holds the query
region and its tiles, numbered; a retrieved slide's file holds the tiles matched there, each
named by the query tiles it is the best match of (as the viewer numbers them), with its
cosine and the slide's similarity and percentile. A tile grid's tissue tiles (`tile
--geojson`) are written the same way.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from histosearch.fileio import atomic_path
from histosearch.search.result import SearchResult, SlideMatch, Tile
from histosearch.tiling import TileGrid

QUERY_CLASS = {"name": "histosearch query", "color": [31, 119, 180]}
REGION_CLASS = {"name": "histosearch region", "color": [44, 160, 44]}
MATCH_CLASS = {"name": "histosearch match", "color": [214, 39, 40]}
TISSUE_CLASS = {"name": "histosearch tissue tile", "color": [255, 127, 14]}


def polygon(x: float, y: float, width: float, height: float) -> dict[str, Any]:
    """A closed rectangle as a GeoJSON Polygon, corners in level-0 pixels."""
    corners = [[x, y], [x + width, y], [x + width, y + height], [x, y + height], [x, y]]
    return {"type": "Polygon", "coordinates": [[[round(a, 2), round(b, 2)] for a, b in corners]]}


def annotation(
    box: tuple[float, float, float, float],
    name: str,
    classification: dict[str, Any],
    measurements: dict[str, float],
) -> dict[str, Any]:
    """One QuPath annotation feature."""
    return {
        "type": "Feature",
        "geometry": polygon(*box),
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": classification,
            "measurements": measurements,
        },
    }


def collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection."""
    return {"type": "FeatureCollection", "features": features}


def _box(tile: Tile) -> tuple[float, float, float, float]:
    assert tile.size is not None
    return tile.x, tile.y, tile.size, tile.size


def query_features(result: SearchResult) -> list[dict[str, Any]]:
    """The query region and the query's tiles, numbered from 1, on the query slide."""
    features = []
    if result.query.region is not None:
        features.append(annotation(result.query.region, "query region", REGION_CLASS, {}))
    features += [
        annotation(_box(tile), f"query {number}", QUERY_CLASS, {})
        for number, tile in enumerate(result.query.tiles, start=1)
        if tile.size is not None
    ]
    return features


def match_features(hit: SlideMatch) -> list[dict[str, Any]]:
    """The tiles of a retrieved slide that are some query tile's best match, each once,
    named by the numbers of the query tiles it matches."""
    by_row: dict[int, list[tuple[int, float]]] = defaultdict(list)
    tiles: dict[int, Tile] = {}
    for number, match in enumerate(hit.matches, start=1):
        by_row[match.reference_row].append((number, match.cosine))
        tiles[match.reference_row] = match.reference
    slide = {"slide similarity": round(hit.similarity, 4)}
    if hit.percentile is not None:
        slide["slide percentile"] = round(hit.percentile, 1)
    features = []
    for row, pairs in sorted(by_row.items(), key=lambda item: item[1][0][0]):
        if tiles[row].size is None:
            continue
        numbers = ", ".join(str(n) for n, _ in pairs)
        cosine = round(max(c for _, c in pairs), 4)
        features.append(
            annotation(
                _box(tiles[row]),
                f"match {numbers}",
                MATCH_CLASS,
                {"cosine": cosine, "query tiles": len(pairs), **slide},
            )
        )
    return features


def patch_features(result: SearchResult) -> dict[int, list[dict[str, Any]]]:
    """The retrieved patches that are tiles of a slide, by slide id, named by rank."""
    features: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rank, hit in enumerate(result.patches, start=1):
        if hit.tile.size is None:
            continue
        measurements = {"similarity": round(hit.similarity, 4)}
        if hit.percentile is not None:
            measurements["percentile"] = round(hit.percentile, 1)
        features[hit.record.id].append(
            annotation(_box(hit.tile), f"rank {rank}", MATCH_CLASS, measurements)
        )
    return features


def qupath_collections(result: SearchResult) -> list[tuple[str, dict[str, Any]]]:
    """(what, FeatureCollection) for the query slide (when it has tiles on a slide), then for
    each retrieved slide with matched tiles, in rank order; `what` is "query" or
    "RANK-NAME"."""
    out = []
    if query := query_features(result):
        out.append(("query", collection(query)))
    if result.mode == "patches":
        features, seen = patch_features(result), set()
        for rank, hit in enumerate(result.patches, start=1):
            if hit.record.id in features and hit.record.id not in seen:
                seen.add(hit.record.id)
                out.append((f"{rank}-{hit.record.name}", collection(features[hit.record.id])))
    else:
        for rank, hit in enumerate(result.slides, start=1):
            if matched := match_features(hit):
                out.append((f"{rank}-{hit.record.name}", collection(matched)))
    return out


def file_stem(name: str) -> str:
    """`name` as a safe file name stem (letters, digits, `.`, `_`, `-`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100]


def write_qupath(result: SearchResult, out: str | Path) -> list[Path]:
    """Write `result` as QuPath GeoJSON: the query slide's features to `out`, each retrieved
    slide's beside it as OUT-RANK-NAME.geojson; returns the files written."""
    out = Path(out)
    written = []
    for what, features in qupath_collections(result):
        if what == "query":
            path = out
        else:
            path = out.with_name(f"{out.stem}-{file_stem(what)}{out.suffix or '.geojson'}")
        written.append(write_geojson(features, path))
    return written


def tissue_collection(grid: TileGrid) -> dict[str, Any]:
    """A grid's tissue tiles as QuPath annotations, in row-major order, with their tissue
    fraction."""
    side = grid.tile_size * grid.downsample
    return collection(
        [
            annotation(
                (int(x), int(y), side, side),
                f"tile {int(x)}, {int(y)}",
                TISSUE_CLASS,
                {"tissue fraction": round(float(fraction), 4)},
            )
            for (x, y), fraction, keep in zip(
                grid.coords, grid.tissue_fraction, grid.is_tissue, strict=True
            )
            if keep
        ]
    )


def write_geojson(features: dict[str, Any], path: str | Path) -> Path:
    """Write one FeatureCollection to `path` (atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(features, indent=1))
    return Path(path)
