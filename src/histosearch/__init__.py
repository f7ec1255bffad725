"""histosearch: content-based similarity search for histopathology slides and patches.

The public API, in the order data flows through it::

    from histosearch import Archive, ArchiveSettings, Searcher

    archive = Archive.create("archive", ArchiveSettings(magnification=5.0))
    archive.add(["slides/", "patches.csv"])
    result = Searcher(archive).search("query.svs", k=5)

Names are imported on first use, so that `import histosearch` (and the CLI) starts fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "HistosearchError": "histosearch.errors",
    "MagnificationError": "histosearch.errors",
    "NoTissueError": "histosearch.errors",
    "SlideReadError": "histosearch.errors",
    "StainError": "histosearch.errors",
    "Slide": "histosearch.slide",
    "open_slide": "histosearch.slide",
    "MacenkoNormalizer": "histosearch.stain",
    "ReinhardNormalizer": "histosearch.stain",
    "TileGrid": "histosearch.tiling",
    "read_tiles": "histosearch.tiling",
    "tile_slide": "histosearch.tiling",
    "HistogramTissueDetector": "histosearch.tissue",
    "OtsuTissueDetector": "histosearch.tissue",
    "make_detector": "histosearch.tissue",
    "Encoder": "histosearch.encoders",
    "create_encoder": "histosearch.encoders",
    "available_encoders": "histosearch.encoders",
    "Archive": "histosearch.archive.archive",
    "ArchiveError": "histosearch.archive.catalog",
    "ArchiveSettings": "histosearch.archive.settings",
    "SlideRecord": "histosearch.archive.catalog",
    "IndexReport": "histosearch.archive.adding",
    "EmbedOptions": "histosearch.embed.options",
    "Searcher": "histosearch.search.searcher",
    "SearchError": "histosearch.search.searcher",
    "SearchResult": "histosearch.search.result",
    "SlideMatch": "histosearch.search.result",
    "PatchMatch": "histosearch.search.result",
    "TileMatch": "histosearch.search.result",
    "Tile": "histosearch.search.result",
    "write_qupath": "histosearch.search.qupath",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'histosearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
