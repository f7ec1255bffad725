"""OME-TIFF and the TIFFs OpenSlide refuses, through tiffslide (tifffile); and the check of a
TIFF's directories that every TIFF passes before any backend reads it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import tifffile
import tiffslide

from histosearch.errors import SlideReadError
from histosearch.slide.base import plausible_mpp, positive_float, reader_notes, with_notes
from histosearch.slide.openslide_files import OpenSlideSlide

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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
    size = positive_float(pixels.attrib["PhysicalSizeX"])
    return None if unit is None or size is None else plausible_mpp(size * unit)


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
                        path, with_notes("truncated or corrupt TIFF: no image directory", notes)
                    )
                for index, page in enumerate(pages):
                    _check_page(path, size, index, page)
                notes.messages.clear()  # diagnosed above; nothing left to warn about
                return bool(tiff.is_ome)
        except SlideReadError:
            raise
        except Exception as error:
            reason = with_notes(f"truncated or corrupt TIFF: {error}", notes)
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
