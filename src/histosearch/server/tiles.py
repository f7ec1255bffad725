"""Deep-zoom tiles of archived slides, from a cache of open slide handles.

OpenSlide-readable files go through OpenSlide's own `DeepZoomGenerator`; the tiffslide and
Pillow backends through the same pyramid computed over `histosearch.slide`.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from histosearch.slide import OpenSlideSlide, Slide, TiffSlideSlide, open_slide

TILE_SIZE = 254  # 254 + 2 x 1 px overlap = 256, the size viewers fetch best
OVERLAP = 1
JPEG_QUALITY = 80
DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"
# Deep-zoom levels up to this side are cut from one cached overview of the slide.
OVERVIEW_SIDE = 1024


class TileNotFound(LookupError):
    """A deep-zoom level or tile address outside the slide's pyramid."""


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB uint8 array."""
    ok, data = cv2.imencode(
        ".jpg", np.ascontiguousarray(pixels[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def is_openslide(slide: Slide) -> bool:
    """Whether OpenSlide itself reads the slide (tiffslide's class derives from OpenSlide's)."""
    return isinstance(slide, OpenSlideSlide) and not isinstance(slide, TiffSlideSlide)


class DeepZoom:
    """A slide's Deep Zoom pyramid: level L halves level L + 1, the last level is the full
    resolution, tiles of TILE_SIZE px sharing OVERLAP px with each neighbour.

    Tiles of OpenSlide files come from OpenSlide's `DeepZoomGenerator`, the others' from
    `Slide.read_scaled`. Levels no larger than OVERVIEW_SIDE are cut from one overview read
    once: a scan without a pyramid would otherwise be read whole for each of its coarse tiles.
    """

    def __init__(self, slide: Slide, tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> None:
        self.slide, self.tile_size, self.overlap = slide, tile_size, overlap
        width, height = slide.dimensions
        self.level_count = math.ceil(math.log2(max(width, height, 1))) + 1
        # halving with rounding up, as OpenSlide's generator does: ceil(ceil(w / 2) / 2) ...
        self.level_dimensions = [
            (max(1, math.ceil(width / 2**s)), max(1, math.ceil(height / 2**s)))
            for s in range(self.level_count - 1, -1, -1)
        ]
        self.generator = (
            DeepZoomGenerator(slide.handle, tile_size, overlap, limit_bounds=False)
            if is_openslide(slide)
            else None
        )
        self._overview: np.ndarray | None = None
        self._overview_lock = threading.Lock()

    def dzi(self) -> str:
        width, height = self.slide.dimensions
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="{DZI_NAMESPACE}" Format="jpeg" Overlap="{self.overlap}" '
            f'TileSize="{self.tile_size}"><Size Width="{width}" Height="{height}"/></Image>'
        )

    def bounds(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a tile in its level's pixels, overlap included."""
        if not 0 <= level < self.level_count:
            raise TileNotFound(f"level {level} is outside 0..{self.level_count - 1}")
        level_w, level_h = self.level_dimensions[level]
        cols, rows = math.ceil(level_w / self.tile_size), math.ceil(level_h / self.tile_size)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"tile {col}_{row} is outside level {level} ({cols}x{rows} tiles)")
        return (
            col * self.tile_size - (self.overlap if col else 0),
            row * self.tile_size - (self.overlap if row else 0),
            min(level_w, (col + 1) * self.tile_size + self.overlap),
            min(level_h, (row + 1) * self.tile_size + self.overlap),
        )

    def tile(self, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of one tile."""
        x0, y0, x1, y1 = self.bounds(level, col, row)
        if max(self.level_dimensions[level]) <= OVERVIEW_SIDE:
            whole = cv2.resize(
                self.overview(), self.level_dimensions[level], interpolation=cv2.INTER_AREA
            )
            return encode_jpeg(whole[y0:y1, x0:x1])
        if self.generator is not None:
            image = self.generator.get_tile(level, (col, row))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=JPEG_QUALITY)
            return buffer.getvalue()
        return encode_jpeg(self._read(level, (x0, y0, x1, y1)))

    def overview(self) -> np.ndarray:
        """The whole slide, longer side OVERVIEW_SIDE at most, read on first use."""
        with self._overview_lock:
            if self._overview is None:
                self._overview = self.slide.thumbnail(OVERVIEW_SIDE)
            return self._overview

    def _read(self, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        scale = 2 ** (self.level_count - 1 - level)  # level-0 pixels per pixel of this level
        # The last row and column of a level reach past the slide's edge: read only what the
        # slide has (backends pad differently), then stretch it over the tile.
        width, height = self.slide.dimensions
        left, top = x0 * scale, y0 * scale
        right, bottom = min(x1 * scale, width), min(y1 * scale, height)
        source_level = self.slide.best_level(scale)
        source_scale = self.slide.level_downsamples[source_level]
        source = (
            max(1, round((right - left) / source_scale)),
            max(1, round((bottom - top) / source_scale)),
        )
        pixels = self.slide.read_scaled((left, top), source, source_scale, source_level)
        if source != (x1 - x0, y1 - y0):
            pixels = cv2.resize(pixels, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        return pixels


@dataclass
class CachedSlide:
    """One cached slide: its handle, its pyramid, and who is using it."""

    slide: Slide
    deep_zoom: DeepZoom
    # OpenSlide reads are thread-safe; tifffile's file handle and the others are not.
    lock: threading.Lock | None
    users: int = 0
    evicted: bool = False
    thumbnail: bytes | None = field(default=None, repr=False)


class SlideCache:
    """Open slides by catalog id, least recently used closed first; safe across threads.

    A slide evicted while a request still reads it is closed when that request ends.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, CachedSlide] = OrderedDict()
        self._lock = threading.Lock()

    @contextmanager
    def use(self, key: int, path: str | Path, mpp: float | None = None) -> Iterator[CachedSlide]:
        """The open slide for `key` (opened from `path` on first use), held for the block."""
        entry = self._acquire(key, path, mpp)
        try:
            if entry.lock is None:
                yield entry
            else:
                with entry.lock:
                    yield entry
        finally:
            self._release(entry)

    def _acquire(self, key: int, path: str | Path, mpp: float | None) -> CachedSlide:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.users += 1
                return entry
        # Opening can take a while: outside the lock, so other slides keep being served.
        slide = open_slide(path, mpp=mpp)
        fresh = CachedSlide(
            slide, DeepZoom(slide), None if is_openslide(slide) else threading.Lock()
        )
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:  # no other request opened it meanwhile
                entry = self._entries[key] = fresh
                while len(self._entries) > self.capacity:
                    _, old = self._entries.popitem(last=False)
                    old.evicted = True
                    if old.users == 0:
                        old.slide.close()
            else:
                fresh.slide.close()
            entry.users += 1
            return entry

    def _release(self, entry: CachedSlide) -> None:
        with self._lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                entry.slide.close()

    def close(self) -> None:
        """Close every slide no request is using (the server is stopping)."""
        with self._lock:
            for entry in self._entries.values():
                entry.evicted = True
                if entry.users == 0:
                    entry.slide.close()
            self._entries.clear()


def thumbnail_jpeg(pixels: np.ndarray, max_size: int) -> bytes:
    """JPEG of `pixels` shrunk so that the longer side is at most `max_size`."""
    image = Image.fromarray(pixels)
    image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    return encode_jpeg(np.asarray(image))
