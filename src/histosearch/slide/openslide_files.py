"""The formats OpenSlide reads: Aperio SVS, generic pyramidal TIFF, DICOM WSI, Hamamatsu,
MIRAX, Philips, Ventana, ..."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import openslide

from histosearch.errors import SlideReadError
from histosearch.slide.base import (
    OVERVIEW_SLACK,
    Slide,
    plausible_mpp,
    positive_float,
    reader_notes,
    to_rgb,
    with_notes,
)


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
                    self.path, with_notes(f"cannot open: {reason}", notes)
                ) from error
            self.level_dimensions = tuple(tuple(map(int, d)) for d in self.handle.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self.handle.level_downsamples)
            # A corrupt tile table often opens fine and fails on the first read: fail here.
            self._read_level((0, 0), self.level_count - 1, (1, 1))
        props = self.handle.properties
        prefix = self._property_prefix
        return (
            plausible_mpp(props.get(f"{prefix}.mpp-x")),
            positive_float(props.get(f"{prefix}.objective-power")),
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
        return to_rgb(region)

    def read_overview(self, size: tuple[int, int], downsample: float) -> np.ndarray:
        level = self.best_level(downsample * OVERVIEW_SLACK)
        thumb_size = self._stored_thumbnail_size()
        if thumb_size is None:
            return super().read_overview(size, downsample)
        thumb_downsample = self.dimensions[0] / thumb_size[0]
        if not self.level_downsamples[level] < thumb_downsample <= downsample * OVERVIEW_SLACK:
            return super().read_overview(size, downsample)
        # The file's own thumbnail (Aperio and others store one) is cheaper than any level.
        thumb = to_rgb(self.handle.associated_images["thumbnail"])
        box_w = min(thumb.shape[1], math.ceil(size[0] * downsample / thumb_downsample))
        box_h = min(thumb.shape[0], math.ceil(size[1] * downsample / thumb_downsample))
        return cv2.resize(thumb[:box_h, :box_w], size, interpolation=cv2.INTER_AREA)

    def _stored_thumbnail_size(self) -> tuple[int, int] | None:
        props, prefix = self.handle.properties, f"{self._property_prefix}.associated.thumbnail"
        width, height = props.get(f"{prefix}.width"), props.get(f"{prefix}.height")
        return None if width is None or height is None else (int(width), int(height))

    def close(self) -> None:
        self.handle.close()
