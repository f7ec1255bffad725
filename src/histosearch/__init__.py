"""histosearch: content-based similarity search for histopathology slides and patches."""

from histosearch.errors import (
    HistosearchError,
    MagnificationError,
    NoTissueError,
    SlideReadError,
    StainError,
)
from histosearch.slide import Slide, open_slide
from histosearch.stain import MacenkoNormalizer, ReinhardNormalizer
from histosearch.tiling import TileGrid, read_tiles, tile_slide
from histosearch.tissue import HistogramTissueDetector, OtsuTissueDetector, make_detector

__all__ = [
    "HistogramTissueDetector",
    "HistosearchError",
    "MacenkoNormalizer",
    "MagnificationError",
    "NoTissueError",
    "OtsuTissueDetector",
    "ReinhardNormalizer",
    "Slide",
    "SlideReadError",
    "StainError",
    "TileGrid",
    "make_detector",
    "open_slide",
    "read_tiles",
    "tile_slide",
]
