"""Slides: one object for every file a user has, read at any magnification.

`open_slide` picks the backend: OpenSlide for the formats it knows (Aperio SVS, generic
pyramidal TIFF, DICOM WSI, Hamamatsu, MIRAX, ...), tiffslide (tifffile) for OME-TIFF and the
TIFFs OpenSlide refuses, Pillow for plain PNG/JPEG images. Callers ask for a magnification;
pyramid levels stay inside `Slide`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
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
        for name, value in (("mpp", mpp), ("objective power", objective_power)):
            if value is not None and _positive_float(value) is None:
                raise MagnificationError(
                    self.path, f"{name} must be a positive number, got {value}"
                )
        self.mpp, self.objective_power = self._resolve_resolution(
            mpp if mpp is not None else file_mpp,
            objective_power if objective_power is not None else file_power,
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
        pixels = self._read_level((x0, y0), level, source)
        if source == (w, h):
            return pixels
        interpolation = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
        return cv2.resize(pixels, (w, h), interpolation=interpolation)

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
            raise SlideReadError(self.path, f"cannot open: {reason}") from error
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self.handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self.handle.level_downsamples)
        # A corrupt tile table often opens fine and fails on the first read: fail here instead.
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
    """A plain image (PNG, JPEG, ...) as a one-level slide held in memory."""

    backend = "pillow"

    def _open(self) -> tuple[float | None, float | None]:
        try:
            with Image.open(self.path) as image:
                self._pixels = np.asarray(image.convert("RGB"))
        except Exception as error:
            raise SlideReadError(self.path, f"cannot read image: {error}") from error
        h, w = self._pixels.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        return None, None

    def close(self) -> None:
        """Nothing to release: the pixels were read into memory on opening."""

    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        x, y = location
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        img_h, img_w = self._pixels.shape[:2]
        x_a, y_a = max(x, 0), max(y, 0)
        x_b, y_b = min(x + w, img_w), min(y + h, img_h)
        if x_b > x_a and y_b > y_a:
            out[y_a - y : y_b - y, x_a - x : x_b - x] = self._pixels[y_a:y_b, x_a:x_b]
        return out


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


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) in TIFF_MAGIC


def _is_ome_tiff(path: Path) -> bool:
    """OME-TIFF, which OpenSlide would open as a flat generic TIFF without pyramid or mpp."""
    try:
        with tifffile.TiffFile(path) as tiff:
            return bool(tiff.is_ome)
    except Exception:  # not readable as TIFF: the backends report why
        return False


def open_slide(
    path: str | Path, *, mpp: float | None = None, objective_power: float | None = None
) -> Slide:
    """Open any supported slide or image; `mpp`/`objective_power` override or fill in the file's."""
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise SlideReadError(path, "the file is empty")
    options = {"mpp": mpp, "objective_power": objective_power}
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSlide(path, **options)
    is_tiff = _is_tiff(path)
    if is_tiff and _is_ome_tiff(path):
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
