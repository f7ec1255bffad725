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
import os

# FAISS and torch each bring their own OpenMP runtime, whose idle threads spin-wait for the
# next parallel region; on a few cores one's spinning threads slow the other's work (stage 2
# after stage 1's FAISS search: 50 ms against 27 ms at 10^6 patches on 2 cores). A short spin
# (libgomp's default is 300,000) keeps both fast. It acts only if set before either loads.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
