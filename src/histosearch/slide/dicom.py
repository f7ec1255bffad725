"""DICOM whole-slide images (Supplement 145) that OpenSlide does not open, through wsidicom.

A file is read with the other files of its series in its folder, as OpenSlide does. A file
that leaves out what wsidicom needs and can be supplied unambiguously (the image type, the
pixel spacing, the order of the tiles when it states no positions, the colour space of JPEG
tiles) is read from a repaired copy in memory, with a warning naming what was missing.
"""

from __future__ import annotations

import io
import logging
import math
import uuid
import warnings
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pydicom
import pydicom.encaps
from PIL import Image
from pydicom.dataset import Dataset
from upath import UPath
from wsidicom import WsiDicom

from histosearch.errors import SlideReadError
from histosearch.slide.base import Slide, plausible_mpp

log = logging.getLogger("histosearch")
# pydicom warns about every value longer than its representation allows (scanners write
# such UIDs and names); they are read all the same, and would repeat on every tile read.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")

DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
# A file that needs repairing is copied into memory whole: larger ones are refused instead.
MAX_REPAIRED_BYTES = 512 << 20
# Pixel spacing (mm) given to a file that records none, so that wsidicom can build its
# pyramid; the slide's resolution stays unknown (mpp None) and must be given.
PLACEHOLDER_SPACING_MM = 0.001
VOLUME_IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def is_dicom(header: bytes) -> bool:
    """Whether a file's first bytes are a DICOM file's (the magic after the preamble)."""
    return header[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


class WsiDicomSlide(Slide):
    """A DICOM WSI series read through wsidicom: its volume pyramid, levels by size."""

    backend = "wsidicom"

    def _open(self) -> tuple[float | None, float | None]:
        self._memory_file: str | None = None
        self.handle, spacing_known = self._open_handle()
        try:
            levels = list(self.handle.levels)
            self._level_numbers = tuple(level.level for level in levels)
            self.level_dimensions = tuple((lv.size.width, lv.size.height) for lv in levels)
            width = self.level_dimensions[0][0]
            self.level_downsamples = tuple(width / w for w, _ in self.level_dimensions)
            # A corrupt frame table often opens fine and fails on the first read: fail here.
            self._read_level((0, 0), self.level_count - 1, (1, 1))
        except SlideReadError:
            self.close()
            raise
        except Exception as error:
            self.close()
            raise SlideReadError(self.path, f"cannot read the DICOM pyramid: {error}") from error
        mpp = plausible_mpp(self.handle.mpp.width) if spacing_known else None
        return mpp, None

    def _open_handle(self) -> tuple[WsiDicom, bool]:
        """The opened series, and whether its pixel spacing is the file's own."""
        path = Path(self.path)
        try:
            return WsiDicom.open(series_files(path)), True
        except Exception as error:
            reason = _reason(error)
        dataset, missing, spacing_known = _repaired(path, reason)
        self._memory_file = f"memory://histosearch-dicom/{uuid.uuid4().hex}/{path.name}"
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        with fsspec.open(self._memory_file, "wb") as file:
            file.write(buffer.getvalue())
        try:
            handle = WsiDicom.open(UPath(self._memory_file))
        except Exception as error:
            self._forget_memory_file()
            raise SlideReadError(path, f"not a readable DICOM WSI: {_reason(error)}") from error
        log.warning("%s: read with what it lacks filled in: %s", path, "; ".join(missing))
        return handle, spacing_known

    def _read_level(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        scale = self.level_downsamples[level]
        at = (round(location[0] / scale), round(location[1] / scale))
        try:
            pixels = self.handle.read_region(at, self._level_numbers[level], size, as_array=True)
        except Exception as error:
            raise SlideReadError(
                self.path, f"reading {size[0]}x{size[1]} px at level {level} failed: {error}"
            ) from error
        return np.array(pixels[..., :3], np.uint8)  # a writable RGB copy

    def close(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle is not None:
            handle.close()
        self._forget_memory_file()

    def _forget_memory_file(self) -> None:
        if getattr(self, "_memory_file", None):
            fsspec.filesystem("memory").rm(self._memory_file.rsplit("/", 1)[0], recursive=True)
            self._memory_file = None


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__


def series_files(path: Path) -> list[Path]:
    """`path` and the DICOM files beside it of the same series (the other pyramid levels,
    label and overview), as OpenSlide gathers them."""
    series = _series_uid(path)
    if series is None:
        return [path]
    others = [
        p
        for p in sorted(path.parent.iterdir())
        if p != path and p.is_file() and _series_uid(p) == series
    ]
    return [path, *others]


def one_per_series(paths: list[Path]) -> list[Path]:
    """`paths` with only the first DICOM file of each series in a folder (the others are its
    pyramid levels, label or overview, read with it)."""
    seen: set[tuple[Path, str]] = set()
    kept = []
    for path in paths:
        series = _series_uid(path) if path.suffix.lower() == ".dcm" else None
        if series is not None:
            if (path.parent, series) in seen:
                continue
            seen.add((path.parent, series))
        kept.append(path)
    return kept


def _series_uid(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            if not is_dicom(file.read(DICOM_MAGIC_OFFSET + 4)):
                return None
        dataset = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
        )
    except Exception:
        return None
    return str(dataset.get("SeriesInstanceUID", "")) or None


def _repaired(path: Path, reason: str) -> tuple[Dataset, list[str], bool]:
    """The dataset of `path` with what a conforming WSI file must state filled in, what was
    missing, and whether the pixel spacing is the file's own; a file that lacks something
    else, or is too large to copy, is refused."""
    size = path.stat().st_size
    if size > MAX_REPAIRED_BYTES:
        raise SlideReadError(path, f"not a DICOM WSI wsidicom reads ({reason})")
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        raise SlideReadError(path, f"unreadable DICOM: {error}") from error
    if "SOPClassUID" not in dataset:
        raise SlideReadError(path, "truncated or corrupt DICOM: its dataset cannot be read")
    if dataset.SOPClassUID != WSI_STORAGE:
        kind = dataset.get("Modality", "unknown modality")
        raise SlideReadError(path, f"a DICOM file, but not a whole-slide image ({kind})")
    needed = ("Rows", "Columns", "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "PixelData")
    if absent := [name for name in needed if name not in dataset]:
        raise SlideReadError(path, f"not a readable DICOM WSI: no {', '.join(absent)}")
    missing: list[str] = []
    if "ImageType" not in dataset:
        dataset.ImageType = VOLUME_IMAGE_TYPE
        missing.append("no ImageType (read as the full-resolution volume)")
    spacing_known = _pixel_spacing(dataset) is not None
    if not spacing_known:
        measures = Dataset()
        measures.PixelSpacing = [PLACEHOLDER_SPACING_MM, PLACEHOLDER_SPACING_MM]
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        dataset.SharedFunctionalGroupsSequence = [shared]
        missing.append("no pixel spacing (the resolution is unknown: give --mpp)")
    if "PerFrameFunctionalGroupsSequence" not in dataset and (
        dataset.get("DimensionOrganizationType") != "TILED_FULL"
    ):
        missing.append(_put_frames_in_order(path, dataset))
    elif _mislabelled_ycbcr(dataset, _frames(path, dataset)[:1]):
        dataset.PhotometricInterpretation = "YBR_FULL_422"
        missing.append("JPEG tiles in YCbCr labelled RGB")
    if not missing:
        raise SlideReadError(path, f"not a DICOM WSI wsidicom reads ({reason})")
    return dataset, missing, spacing_known


def _pixel_spacing(dataset: Dataset) -> Any:
    try:
        return dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError):
        return None


def _frames(path: Path, dataset: Dataset) -> list[bytes]:
    count = int(dataset.get("NumberOfFrames", 1))
    try:
        return list(pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=count))
    except Exception as error:
        raise SlideReadError(path, f"truncated or corrupt DICOM pixel data: {error}") from error


def _mislabelled_ycbcr(dataset: Dataset, frames: list[bytes]) -> bool:
    """JPEG tiles whose JFIF header says YCbCr in a file that calls them RGB."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    return (
        syntax == JPEG_BASELINE
        and dataset.get("PhotometricInterpretation") == "RGB"
        and bool(frames)
        and b"JFIF" in frames[0][:32]
    )


def _put_frames_in_order(path: Path, dataset: Dataset) -> str:
    """Store the tiles of a file that states neither positions nor an order row by row (the
    standard's TILED_FULL): kept as they are unless they join up only column by column."""
    columns = math.ceil(int(dataset.TotalPixelMatrixColumns) / int(dataset.Columns))
    rows = math.ceil(int(dataset.TotalPixelMatrixRows) / int(dataset.Rows))
    frames = _frames(path, dataset)
    if len(frames) != columns * rows:
        raise SlideReadError(
            path,
            f"{len(frames)} tiles without positions for a {columns}x{rows} grid: cannot place them",
        )
    note = "no tile order (TILED_FULL)"
    if _mislabelled_ycbcr(dataset, frames):
        dataset.PhotometricInterpretation = "YBR_FULL_422"
        note += "; JPEG tiles in YCbCr labelled RGB"
    if (
        columns > 1
        and rows > 1
        and _seams(frames, columns, rows, by_column=True)
        < 0.5 * _seams(frames, columns, rows, by_column=False)
    ):
        by_row = [frames[c * rows + r] for r in range(rows) for c in range(columns)]
        dataset.PixelData = pydicom.encaps.encapsulate(by_row)
        note += "; tiles stored column by column, put in row order"
    dataset.DimensionOrganizationType = "TILED_FULL"
    return note


def _seams(frames: list[bytes], columns: int, rows: int, by_column: bool) -> float:
    """Mean step in colour across the borders between the first row's and the first
    column's neighbouring tiles, with the frames taken in row or in column order."""

    def tile(column: int, row: int) -> np.ndarray:
        index = column * rows + row if by_column else row * columns + column
        return np.asarray(Image.open(io.BytesIO(frames[index])).convert("RGB"), np.float32)

    steps = [
        np.abs(tile(c, 0)[:, -1] - tile(c + 1, 0)[:, 0]).mean() for c in range(columns - 2)
    ] + [np.abs(tile(0, r)[-1] - tile(0, r + 1)[0]).mean() for r in range(rows - 2)]
    return float(np.mean(steps)) if steps else 0.0
