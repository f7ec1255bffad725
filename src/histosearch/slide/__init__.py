"""Slides: one object for every file a user has, read at any magnification.

`open_slide` picks the backend, one module each: OpenSlide for the formats it knows (Aperio
SVS, generic pyramidal TIFF, DICOM WSI, Hamamatsu, MIRAX, ...), tiffslide (tifffile) for
OME-TIFF and the TIFFs OpenSlide refuses, wsidicom for the DICOM WSIs OpenSlide cannot open
and for slides on a DICOMweb server, Pillow for plain PNG/JPEG images. Callers ask for a
magnification; pyramid levels stay inside `Slide`.
"""

from histosearch.slide.base import Slide, magnification_from_mpp
from histosearch.slide.dicom import WsiDicomSlide, one_per_series
from histosearch.slide.dicomweb import DicomWebSlide, is_dicomweb, parse_dicomweb
from histosearch.slide.image import IMAGE_SUFFIXES, ImageSlide, read_image
from histosearch.slide.opening import open_slide
from histosearch.slide.openslide_files import OpenSlideSlide
from histosearch.slide.tiff import TiffSlideSlide, inspect_tiff

__all__ = [
    "IMAGE_SUFFIXES",
    "DicomWebSlide",
    "ImageSlide",
    "OpenSlideSlide",
    "Slide",
    "TiffSlideSlide",
    "WsiDicomSlide",
    "inspect_tiff",
    "is_dicomweb",
    "magnification_from_mpp",
    "one_per_series",
    "open_slide",
    "parse_dicomweb",
    "read_image",
]
