"""Slides: one object for every file a user has, read at any magnification.

`open_slide` picks the backend: OpenSlide for the formats it knows (Aperio SVS, generic
pyramidal TIFF, DICOM WSI, Hamamatsu, MIRAX, ...), tiffslide (tifffile) for OME-TIFF and the
TIFFs OpenSlide refuses, Pillow for plain PNG/JPEG images. Callers ask for a magnification;
pyramid levels stay inside `Slide`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from xml.etree import ElementTree

import cv2
import numpy as np
import openslide
import tifffile
import tiffslide
from PIL import Image

from histosearch.errors import MagnificationError, SlideReadError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Plain-image signatures: such a file is read by Pillow whatever its name says.
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")

# A plain image (no random access, decoded whole) larger than this is refused before any
# decoding: Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~179 Mpx,
# ~540 MB of RGB), which a 13,000 x 13,000 px image still fits.
MAX_PLAIN_PIXELS = 2 * 89_478_485
# Any overview (tissue detection, thumbnail) decodes the slide's coarsest level whole: a file
# whose coarsest level is larger than this (a flat TIFF without a pyramid, or a header that
# lies) is refused at opening instead of reading for minutes. 1 Gpx is ~32,000 px square.
MAX_OVERVIEW_PIXELS = 1 << 30
# JPEG files decode at 1/2, 1/4 or 1/8 scale for little more than the cost of the smaller
# image (Pillow's draft mode): plain JPEGs get these as pyramid levels.
JPEG_DRAFT_SCALES = (1, 2, 4, 8)

# Warnings from the readers (tifffile logs them, Pillow warns) are re-emitted here with the
# file's name, or folded into the error when the file cannot be read.
log = logging.getLogger("histosearch")

# Microns per pixel outside this range are not a microscope scan: a TIFF written with the
# default 72 dpi says 352.8 um/px, which is a screen resolution, not the specimen's.
PLAUSIBLE_MPP = (0.05, 20.0)
# A level whose downsample is within 1% of the one wanted is read without resizing
# (scanners store 2.0005 for a nominal 2).
LEVEL_TOLERANCE = 0.01
# An overview (tissue detection) may come from a level or stored thumbnail this many times
# coarser than asked: detection needs shapes, not detail, and big reads cost the most.
OVERVIEW_SLACK = 2.0
# Regions larger than this at the source level are read block by block to bound memory.
MAX_SOURCE_BLOCK = 4096


def magnification_from_mpp(mpp: float) -> float:
    """Nominal objective magnification of a scan at `mpp` microns per pixel (20x ~ 0.5 um/px)."""
    return 10.0 / mpp


def _plausible_mpp(value: Any) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and math.isfinite(number) else None


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB array of a PIL image; transparent pixels (outside the scanned area) become white."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only arrays


class _Notes(logging.Handler):
    """Collects the messages the readers log or warn while a file is opened or read."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def summary(self) -> str:
        unique = list(dict.fromkeys(m.split("> ", 1)[-1] for m in self.messages))
        return "; ".join(unique[:3])


@contextlib.contextmanager
def reader_notes(path: Path) -> Iterator[_Notes]:
    """Capture tifffile/tiffslide log records and Python warnings raised inside the block;
    on success they are logged again as warnings naming `path`."""
    notes = _Notes()
    loggers = [logging.getLogger(name) for name in ("tifffile", "tiffslide")]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(notes)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Sizes are checked against MAX_PLAIN_PIXELS before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield notes
        notes.messages.extend(str(w.message) for w in caught)
    finally:
        for lg, propagate in saved:
            lg.removeHandler(notes)
            lg.propagate = propagate
    if notes.messages:
        log.warning("%s: %s", path, notes.summary())


def _with_notes(reason: str, notes: _Notes) -> str:
    summary = notes.summary()
    return f"{reason} ({summary})" if summary and summary not in reason else reason


class Slide(ABC):
    """A whole-slide image or a plain image, read at any magnification.

    Coordinates are level-0 pixels (x, y), as in OpenSlide and the CLAM/TRIDENT feature files;
    sizes are pixels at the requested magnification.
    """

    backend: ClassVar[str]

    def __init__(
        self,
        path: str | Path,
        *,
        mpp: float | None = None,
        objective_power: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.level_dimensions: tuple[tuple[int, int], ...]
        self.level_downsamples: tuple[float, ...]
        file_mpp, file_power = self._open()
        self._check_overview_size()
        for name, value in (("mpp", mpp), ("objective power", objective_power)):
            if value is not None and _positive_float(value) is None:
                raise MagnificationError(
                    self.path, f"{name} must be a positive number, got {value}"
                )
        self.mpp, self.objective_power = self._resolve_resolution(
            mpp if mpp is not None else file_mpp,
            objective_power if objective_power is not None else file_power,
        )

    def _check_overview_size(self) -> None:
        w, h = self.level_dimensions[-1]
        if w * h > MAX_OVERVIEW_PIXELS:
            self.close()
            levels = "its only level" if self.level_count == 1 else "its coarsest level"
            raise SlideReadError(
                self.path,
                f"{levels} is {w}x{h} px ({w * h / 1e9:.1f} Gpx): an overview would decode "
                f"all of it (limit {MAX_OVERVIEW_PIXELS / 1e9:.1f} Gpx). Save it as a "
                "pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid)",
            )

    @staticmethod
    def _resolve_resolution(
        mpp: float | None, power: float | None
    ) -> tuple[float | None, float | None]:
        if power is None and mpp is not None:
            power = magnification_from_mpp(mpp)
        if mpp is None and power is not None:
            mpp = magnification_from_mpp(power)  # the same relation read the other way
        return mpp, power

    @abstractmethod
    def _open(self) -> tuple[float | None, float | None]:
        """Open the file, set the level geometry, return (mpp, objective power) from the file."""

    @abstractmethod
    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of `size` pixels at `level`, top-left at level-0 `location`."""

    @abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        power = f"{self.objective_power:g}x" if self.objective_power else "unknown magnification"
        w, h = self.dimensions
        return f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, {power})"

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def downsample_for(self, magnification: float) -> float:
        """Level-0 pixels per pixel at `magnification`; errors for one the scan cannot give."""
        if self.objective_power is None:
            raise MagnificationError(
                self.path,
                "the file records neither microns per pixel nor objective power; "
                "give them (--mpp or --objective-power)",
            )
        if not magnification > 0:
            raise MagnificationError(
                self.path, f"magnification must be positive, got {magnification}"
            )
        downsample = self.objective_power / magnification
        if downsample < 1 - LEVEL_TOLERANCE:
            raise MagnificationError(
                self.path,
                f"{magnification:g}x asked, but the slide was scanned at "
                f"{self.objective_power:g}x ({self.mpp:.3f} um/px)",
            )
        return max(downsample, 1.0)

    def mpp_at(self, magnification: float) -> float | None:
        """Microns per pixel at `magnification`."""
        if self.mpp is None:
            return None
        return self.mpp * self.downsample_for(magnification)

    def size_at(self, magnification: float) -> tuple[int, int]:
        """(width, height) of the whole slide at `magnification`."""
        downsample = self.downsample_for(magnification)
        w, h = self.dimensions
        return int(w / downsample), int(h / downsample)

    def best_level(self, downsample: float) -> int:
        """The smallest level still at least as detailed as `downsample` asks."""
        level = 0
        for index, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * (1 + LEVEL_TOLERANCE):
                level = index
        return level

    def read_region(
        self, location: tuple[int, int], size: tuple[int, int], magnification: float
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3): `size` pixels at `magnification` from level-0 `location`."""
        return self.read_scaled(location, size, self.downsample_for(magnification))

    def read_scaled(
        self,
        location: tuple[int, int],
        size: tuple[int, int],
        downsample: float,
        level: int | None = None,
    ) -> np.ndarray:
        """Like `read_region`, with the scale given as level-0 pixels per output pixel; `level`
        forces the pyramid level read from (default: the smallest one detailed enough)."""
        out_w, out_h = size
        if out_w <= 0 or out_h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        if level is None:
            level = self.best_level(downsample)
        scale = downsample / self.level_downsamples[level]  # level pixels per output pixel
        # Output pixels per block so that one source block stays within MAX_SOURCE_BLOCK.
        block = max(1, int(MAX_SOURCE_BLOCK / scale))
        if out_w <= block and out_h <= block:
            return self._read_resized(location, level, scale, downsample, (0, 0), size)
        out = np.empty((out_h, out_w, 3), np.uint8)
        for y in range(0, out_h, block):
            for x in range(0, out_w, block):
                w, h = min(block, out_w - x), min(block, out_h - y)
                out[y : y + h, x : x + w] = self._read_resized(
                    location, level, scale, downsample, (x, y), (w, h)
                )
        return out

    def _read_resized(
        self,
        location: tuple[int, int],
        level: int,
        scale: float,
        downsample: float,
        offset: tuple[int, int],
        size: tuple[int, int],
    ) -> np.ndarray:
        x0 = location[0] + round(offset[0] * downsample)
        y0 = location[1] + round(offset[1] * downsample)
        w, h = size
        source = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = self._read_within((x0, y0), level, source)
        if source == (w, h):
            return pixels
        interpolation = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        return cv2.resize(pixels, (w, h), interpolation=interpolation)

    def _read_within(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """`_read_level`, with what lies right of or below the level read as white glass
        (backends differ: transparent, black or an error)."""
        level_w, level_h = self.level_dimensions[level]
        scale = self.level_downsamples[level]
        inside_w = min(size[0], math.floor(level_w - location[0] / scale))
        inside_h = min(size[1], math.floor(level_h - location[1] / scale))
        if (inside_w, inside_h) == size:
            return self._read_level(location, level, size)
        pixels = np.full((size[1], size[0], 3), 255, np.uint8)
        if inside_w > 0 and inside_h > 0:
            pixels[:inside_h, :inside_w] = self._read_level(location, level, (inside_w, inside_h))
        return pixels

    def read_overview(self, size: tuple[int, int], downsample: float) -> np.ndarray:
        """The region of `size` pixels from the top-left corner at `downsample`, read cheaply:
        from a coarser level (up to OVERVIEW_SLACK times less detailed), then resized."""
        return self.read_scaled(
            (0, 0), size, downsample, self.best_level(downsample * OVERVIEW_SLACK)
        )

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide as an RGB array whose longer side is at most `max_size`."""
        w, h = self.dimensions
        downsample = max(1.0, max(w, h) / max_size)
        size = (max(1, int(w / downsample)), max(1, int(h / downsample)))
        return self.read_scaled((0, 0), size, downsample)


class OpenSlideSlide(Slide):
    """Every format OpenSlide reads: Aperio, generic TIFF, DICOM, Hamamatsu, MIRAX, Philips, ..."""

    backend = "openslide"
    _property_prefix = "openslide"

    def _open_handle(self) -> Any:
        return openslide.OpenSlide(self.path)

    def _open(self) -> tuple[float | None, float | None]:
        with reader_notes(self.path) as notes:
            try:
                self.handle = self._open_handle()
            except SlideReadError:
                raise
            except openslide.OpenSlideUnsupportedFormatError as error:
                raise SlideReadError(
                    self.path, "corrupt or unsupported: not a format OpenSlide reads"
                ) from error
            except Exception as error:  # each backend raises its own types for corrupt files
                reason = str(error).replace(f"Reading {self.path}: ", "")
                raise SlideReadError(
                    self.path, _with_notes(f"cannot open: {reason}", notes)
                ) from error
            self.level_dimensions = tuple(tuple(map(int, d)) for d in self.handle.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self.handle.level_downsamples)
            # A corrupt tile table often opens fine and fails on the first read: fail here.
            self._read_level((0, 0), self.level_count - 1, (1, 1))
        props = self.handle.properties
        prefix = self._property_prefix
        return (
            _plausible_mpp(props.get(f"{prefix}.mpp-x")),
            _positive_float(props.get(f"{prefix}.objective-power")),
        )

    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        try:
            region = self.handle.read_region(location, level, size)
        except Exception as error:
            raise SlideReadError(
                self.path, f"reading {size[0]}x{size[1]} px at level {level} failed: {error}"
            ) from error
        return _to_rgb(region)

    def read_overview(self, size: tuple[int, int], downsample: float) -> np.ndarray:
        level = self.best_level(downsample * OVERVIEW_SLACK)
        thumb_size = self._stored_thumbnail_size()
        if thumb_size is None:
            return super().read_overview(size, downsample)
        thumb_downsample = self.dimensions[0] / thumb_size[0]
        if not self.level_downsamples[level] < thumb_downsample <= downsample * OVERVIEW_SLACK:
            return super().read_overview(size, downsample)
        # The file's own thumbnail (Aperio and others store one) is cheaper than any level.
        thumb = _to_rgb(self.handle.associated_images["thumbnail"])
        box_w = min(thumb.shape[1], math.ceil(size[0] * downsample / thumb_downsample))
        box_h = min(thumb.shape[0], math.ceil(size[1] * downsample / thumb_downsample))
        return cv2.resize(thumb[:box_h, :box_w], size, interpolation=cv2.INTER_AREA)

    def _stored_thumbnail_size(self) -> tuple[int, int] | None:
        props, prefix = self.handle.properties, f"{self._property_prefix}.associated.thumbnail"
        width, height = props.get(f"{prefix}.width"), props.get(f"{prefix}.height")
        return None if width is None or height is None else (int(width), int(height))

    def close(self) -> None:
        self.handle.close()


class TiffSlideSlide(OpenSlideSlide):
    """OME-TIFF and the TIFFs OpenSlide refuses (plain or non-standard), through tifffile."""

    backend = "tiffslide"
    _property_prefix = "tiffslide"

    def _open_handle(self) -> Any:
        handle = tiffslide.TiffSlide(self.path)
        if not handle.ts_tifffile.series:
            handle.close()
            raise SlideReadError(self.path, "truncated or corrupt TIFF: no readable image in it")
        series = handle.ts_tifffile.series[0]
        if not (
            series.axes.endswith("S") and series.shape[-1] in (3, 4) and series.dtype == np.uint8
        ):
            handle.close()
            raise SlideReadError(
                self.path,
                f"not a brightfield RGB image (axes {series.axes}, shape {series.shape}, "
                f"{series.dtype}); multiplex fluorescence and grayscale scans are not supported",
            )
        return handle

    def _open(self) -> tuple[float | None, float | None]:
        mpp, power = super()._open()
        if mpp is None and self.handle.ts_tifffile.is_ome:
            mpp = _ome_mpp(self.handle.ts_tifffile.ome_metadata)
        return mpp, power


class ImageSlide(Slide):
    """A plain image (PNG, JPEG, ...) as a slide, decoded only when read.

    Images above MAX_PLAIN_PIXELS are refused from their header. A JPEG gets levels at 1/2,
    1/4 and 1/8 scale (decoded in Pillow's draft mode), so overviews and thumbnails never
    decode it whole; other formats have one level, decoded once on the first read.
    """

    backend = "pillow"

    def _open(self) -> tuple[float | None, float | None]:
        with _decoding(self.path) as image:
            (w, h), jpeg = image.size, image.format == "JPEG"
        scales = JPEG_DRAFT_SCALES if jpeg else (1,)
        self.level_dimensions = tuple((-(-w // s), -(-h // s)) for s in scales)
        self.level_downsamples = tuple(float(s) for s in scales)
        self._levels: dict[int, Image.Image] = {}
        self._level(self.level_count - 1)  # a truncated or corrupt file fails here
        return None, None

    def _level(self, level: int) -> Image.Image:
        """The RGB image of `level`, decoded on first use (transparent pixels white)."""
        if level not in self._levels:
            with _decoding(self.path) as image:
                if level:
                    image.draft("RGB", self.level_dimensions[level])
                rgb = _flatten(image)
            if rgb.size != self.level_dimensions[level]:
                # Draft decodes to the nearest scale it supports: fit the declared size.
                rgb = rgb.resize(self.level_dimensions[level], Image.Resampling.BOX)
            self._levels[level] = rgb
        return self._levels[level]

    def close(self) -> None:
        self._levels = {}

    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        image = self._level(level)
        scale = self.level_downsamples[level]
        x, y = round(location[0] / scale), round(location[1] / scale)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        x_a, y_a = max(x, 0), max(y, 0)
        x_b, y_b = min(x + w, image.width), min(y + h, image.height)
        if x_b > x_a and y_b > y_a:
            out[y_a - y : y_b - y, x_a - x : x_b - x] = np.asarray(image.crop((x_a, y_a, x_b, y_b)))
        return out


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[Image.Image]:
    """A plain image opened by Pillow (header only), refused above MAX_PLAIN_PIXELS; every
    error and warning of Pillow's becomes one SlideReadError naming `path`."""
    with reader_notes(path) as notes:
        try:
            with Image.open(path) as image:
                w, h = image.size
                if w * h > MAX_PLAIN_PIXELS:
                    raise SlideReadError(
                        path,
                        f"a plain image of {w}x{h} px ({w * h / 1e6:.0f} Mpx) is over the "
                        f"{MAX_PLAIN_PIXELS / 1e6:.0f} Mpx that are decoded whole; save it as "
                        "a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid)",
                    )
                yield image
        except SlideReadError:
            raise
        except Image.DecompressionBombError as error:
            raise SlideReadError(path, f"refused before decoding, too large: {error}") from error
        except Exception as error:
            reason = str(error).replace(str(path), "").strip(" '\"")
            if "truncated" in reason:
                reason = f"truncated: {reason}"
            raise SlideReadError(
                path, _with_notes(f"cannot read image: {reason}", notes)
            ) from error


def _flatten(image: Image.Image) -> Image.Image:
    """Decode `image` to RGB; transparent pixels (outside a scanned area) become white."""
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(path: str | Path) -> np.ndarray:
    """A whole plain image (a patch) as RGB uint8; any failure is a SlideReadError."""
    path = Path(path)
    _file_header(path)
    with _decoding(path) as image:
        return np.array(_flatten(image))


OME_UNITS_IN_MICRONS = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}


def _ome_mpp(ome_xml: str | None) -> float | None:
    """PhysicalSizeX of the first OME image, in microns (tiffslide does not read it)."""
    if not ome_xml:
        return None
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    unit = OME_UNITS_IN_MICRONS.get(pixels.attrib.get("PhysicalSizeXUnit", "µm"))
    size = _positive_float(pixels.attrib["PhysicalSizeX"])
    return None if unit is None or size is None else _plausible_mpp(size * unit)


def _file_header(path: Path) -> bytes:
    """The first bytes of `path`, after naming what makes it unreadable as a file."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise SlideReadError(path, f"broken symbolic link to {os.readlink(path)}") from None
        raise SlideReadError(path, "no such file") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SlideReadError(path, "symbolic link loop") from None
        raise SlideReadError(path, f"cannot access: {error.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise SlideReadError(path, "is a directory, not a slide file")
    if not stat.S_ISREG(info.st_mode):
        raise SlideReadError(path, "not a regular file (a pipe, socket or device)")
    if info.st_size == 0:
        raise SlideReadError(path, "the file is empty")
    try:
        with path.open("rb") as file:
            return file.read(16)
    except PermissionError:
        raise SlideReadError(path, "permission denied") from None
    except OSError as error:
        raise SlideReadError(path, f"cannot read: {error.strerror}") from None


def _is_image(header: bytes) -> bool:
    return header.startswith(IMAGE_MAGIC) or (header[:4] == b"RIFF" and header[8:12] == b"WEBP")


def inspect_tiff(path: Path) -> bool:
    """Check a TIFF's directories before any backend reads it: refuse a truncated file, a
    header whose declared size its tile table does not cover, and pixels that are not 8-bit
    RGB. Returns whether it is an OME-TIFF."""
    size = path.stat().st_size
    with reader_notes(path) as notes:
        try:
            with tifffile.TiffFile(path) as tiff:
                pages = list(tiff.pages)
                # tifffile stops at a directory offset past the end and only logs it.
                beyond = [int(m) for m in _offsets_in(notes.messages) if int(m) >= size]
                if beyond:
                    # Far past the end is a garbled offset rather than a cut-off file.
                    kind = "truncated" if beyond[0] < 16 * size else "corrupt TIFF"
                    raise SlideReadError(
                        path,
                        f"{kind}: the file has {size:,} bytes, but its image directory "
                        f"{len(pages)} is at byte {beyond[0]:,}",
                    )
                if not pages:
                    raise SlideReadError(
                        path, _with_notes("truncated or corrupt TIFF: no image directory", notes)
                    )
                for index, page in enumerate(pages):
                    _check_page(path, size, index, page)
                notes.messages.clear()  # diagnosed above; nothing left to warn about
                return bool(tiff.is_ome)
        except SlideReadError:
            raise
        except Exception as error:
            reason = _with_notes(f"truncated or corrupt TIFF: {error}", notes)
            raise SlideReadError(path, reason) from error


def _offsets_in(messages: list[str]) -> list[str]:
    return [m.group(1) for m in map(_BAD_OFFSET.search, messages) if m]


_BAD_OFFSET = re.compile(r"invalid (?:page|offset to first page)\D*(\d+)")


def _check_page(path: Path, size: int, index: int, page: Any) -> None:
    if not isinstance(page, tifffile.TiffPage):
        return
    ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
    if ends and max(ends) > size:
        raise SlideReadError(
            path,
            f"truncated: the file has {size:,} bytes, but image {index}'s data runs to byte "
            f"{max(ends):,}",
        )
    if page.is_tiled:
        across = -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
        expected = across * (page.samplesperpixel if page.planarconfig == 2 else 1)
    else:
        rows = page.rowsperstrip or page.imagelength
        expected = -(-page.imagelength // max(1, rows))
        expected *= page.samplesperpixel if page.planarconfig == 2 else 1
    if len(page.dataoffsets) < expected:
        kind = "tiles" if page.is_tiled else "strips"
        raise SlideReadError(
            path,
            f"corrupt header: image {index} claims {page.imagewidth}x{page.imagelength} px in "
            f"{expected:,} {kind} but lists {len(page.dataoffsets):,} (a damaged file or a "
            "decompression bomb)",
        )
    if index == 0:
        photometric = getattr(page.photometric, "name", str(page.photometric))
        rgb = photometric in ("RGB", "YCBCR") and page.samplesperpixel in (3, 4)
        if not (rgb and page.bitspersample == 8):
            raise SlideReadError(
                path,
                f"not a brightfield RGB image ({photometric}, {page.samplesperpixel} "
                f"sample(s) of {page.bitspersample} bits); multiplex fluorescence and "
                "grayscale scans are not supported",
            )


def open_slide(
    path: str | Path, *, mpp: float | None = None, objective_power: float | None = None
) -> Slide:
    """Open any supported slide or image; `mpp`/`objective_power` override or fill in the file's.

    Every failure is a SlideReadError naming the file and the reason (missing, a directory,
    a link loop, unreadable, empty, truncated, too large to read safely, unsupported)."""
    path = Path(path)
    header = _file_header(path)
    options = {"mpp": mpp, "objective_power": objective_power}
    if _is_image(header) or (
        path.suffix.lower() in IMAGE_SUFFIXES and header[:4] not in TIFF_MAGIC
    ):
        return ImageSlide(path, **options)
    is_tiff = header[:4] in TIFF_MAGIC
    if is_tiff and inspect_tiff(path):
        return TiffSlideSlide(path, **options)
    try:
        return OpenSlideSlide(path, **options)
    except SlideReadError as error:
        # Only a format OpenSlide does not know goes on to tifffile; a file OpenSlide knows but
        # cannot decode (a corrupt SVS, an unknown compression) is reported with its diagnosis.
        refused = isinstance(error.__cause__, openslide.OpenSlideUnsupportedFormatError)
        if not (refused and is_tiff):
            raise
    return TiffSlideSlide(path, **options)
