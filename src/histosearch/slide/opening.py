"""`open_slide`: the backend for a slide, picked by what the file is (its first bytes), or by
its URL for a slide on a DICOMweb server."""

from __future__ import annotations

from pathlib import Path

import openslide

from histosearch.errors import SlideReadError
from histosearch.slide.base import Slide, file_header
from histosearch.slide.dicom import WsiDicomSlide, is_dicom
from histosearch.slide.dicomweb import DicomWebSlide, parse_dicomweb
from histosearch.slide.image import IMAGE_SUFFIXES, ImageSlide, is_image
from histosearch.slide.openslide_files import OpenSlideSlide
from histosearch.slide.tiff import TIFF_MAGIC, TiffSlideSlide, inspect_tiff


def open_slide(
    path: str | Path, *, mpp: float | None = None, objective_power: float | None = None
) -> Slide:
    """Open any supported slide or image; `mpp`/`objective_power` override or fill in the file's.

    Plain images go to Pillow, OME-TIFFs to tiffslide, everything else to OpenSlide first: a
    TIFF it does not know goes on to tiffslide, a DICOM file it cannot open to wsidicom. A
    `dicomweb://` URL is read from its server. Every failure is a SlideReadError naming the
    file and the reason (missing, a directory, a link loop, unreadable, empty, truncated, too
    large to read safely, unsupported)."""
    options = {"mpp": mpp, "objective_power": objective_power}
    if (address := parse_dicomweb(path)) is not None:
        return DicomWebSlide(address.url, **options)
    path = Path(path)
    header = file_header(path)
    if is_image(header) or (path.suffix.lower() in IMAGE_SUFFIXES and header[:4] not in TIFF_MAGIC):
        return ImageSlide(path, **options)
    is_tiff = header[:4] in TIFF_MAGIC
    if is_tiff and inspect_tiff(path):
        return TiffSlideSlide(path, **options)
    try:
        return OpenSlideSlide(path, **options)
    except SlideReadError as error:
        if is_dicom(header):
            return _through_wsidicom(path, options, error)
        # Only a format OpenSlide does not know goes on to tifffile; a file OpenSlide knows but
        # cannot decode (a corrupt SVS, an unknown compression) is reported with its diagnosis.
        refused = isinstance(error.__cause__, openslide.OpenSlideUnsupportedFormatError)
        if not (refused and is_tiff):
            raise
    return TiffSlideSlide(path, **options)


def _through_wsidicom(
    path: Path, options: dict[str, float | None], openslide_error: SlideReadError
) -> Slide:
    """A DICOM file OpenSlide refused, read by wsidicom; when neither reads it, both say why."""
    try:
        return WsiDicomSlide(path, **options)
    except SlideReadError as error:
        raise SlideReadError(
            path, f"{error.reason} (OpenSlide: {openslide_error.reason})"
        ) from error
