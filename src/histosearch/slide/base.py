"""`Slide`, the base every backend implements: level geometry, resolution, and reads at any
magnification (pyramid levels stay inside it); with the helpers the backends share."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import stat
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from histosearch.errors import MagnificationError, SlideReadError, UnknownResolutionError

# Any overview (tissue detection, thumbnail) decodes the slide's coarsest level whole: a file
# whose coarsest level is larger than this (a flat TIFF without a pyramid, or a header that
# lies) is refused at opening instead of reading for minutes. 1 Gpx is ~32,000 px square.
MAX_OVERVIEW_PIXELS = 1 << 30
# How much of a file `file_header` reads: a DICOM file's magic comes after a 128-byte preamble.
HEADER_BYTES = 132

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


def plausible_mpp(value: Any) -> float | None:
    """`value` as microns per pixel if it is a number a microscope scan can have, else None."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def positive_float(value: Any) -> float | None:
    """`value` as a finite positive float, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and math.isfinite(number) else None


def to_rgb(image: Image.Image) -> np.ndarray:
    """RGB array of a PIL image; transparent pixels (outside the scanned area) become white."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.array(image.convert("RGB"))  # a writable copy: torch warns on read-only arrays


class Notes(logging.Handler):
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
def reader_notes(path: Path) -> Iterator[Notes]:
    """Capture tifffile/tiffslide log records and Python warnings raised inside the block;
    on success they are logged again as warnings naming `path`."""
    notes = Notes()
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


def with_notes(reason: str, notes: Notes) -> str:
    """`reason`, followed by what the readers noted while failing (when it adds anything)."""
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
        self.path: Path | str = self._locate(path)
        self.level_dimensions: tuple[tuple[int, int], ...]
        self.level_downsamples: tuple[float, ...]
        file_mpp, file_power = self._open()
        self._check_overview_size()
        for name, value in (("mpp", mpp), ("objective power", objective_power)):
            if value is not None and positive_float(value) is None:
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

    @staticmethod
    def _locate(path: str | Path) -> Path | str:
        """What `path` names the slide by (a file path; a remote backend keeps its URL)."""
        return Path(path)

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
            raise UnknownResolutionError(
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


def file_header(path: Path) -> bytes:
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
            return file.read(HEADER_BYTES)
    except PermissionError:
        raise SlideReadError(path, "permission denied") from None
    except OSError as error:
        raise SlideReadError(path, f"cannot read: {error.strerror}") from None
