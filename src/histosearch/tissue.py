"""Tissue detection: which tiles hold tissue, which only glass (or pen ink).

Both detectors look at an RGB image made of `rows x cols` blocks of `p x p` pixels, one block
per tile (a low-magnification thumbnail of the grid, or one tile read whole), and return each
block's tissue fraction and decision:

- `otsu`: Otsu's threshold on the HSV saturation of the whole image, floored so that glass
  with no stain at all does not split into two classes; the fast default.
- `histogram`: the rule of Afshari & Tizhoosh: grey levels binned into [0, a], (a, b],
  (b, 255]; a tile is background when the ratio of the bright third bin to the dark first bin
  exceeds `max_ratio`.

Pen ink (green, blue, saturated red) counts as glass for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import cv2
import numpy as np

# OpenCV hue runs 0..179 (degrees / 2). H&E sits in purple-pink (120..179 and 0..10), DAB
# brown in 5..25, haematoxylin counterstain in 100..130; pen inks are green/cyan, vivid blue
# and vivid red.
GREEN_PEN_HUE = (30, 100)
BLUE_PEN_HUE = (100, 125)
RED_PEN_HUES = ((170, 180), (0, 5))
GREEN_PEN_MIN_SATURATION = 60
BLUE_PEN_MIN_SATURATION = 170
RED_PEN_MIN_SATURATION = 200


def _in_hue(hue: np.ndarray, low: int, high: int) -> np.ndarray:
    return (hue >= low) & (hue < high)


def pen_mask(hsv: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or red marker ink, from an HSV (OpenCV convention) image."""
    hue, saturation = hsv[..., 0], hsv[..., 1]
    green = _in_hue(hue, *GREEN_PEN_HUE) & (saturation >= GREEN_PEN_MIN_SATURATION)
    blue = _in_hue(hue, *BLUE_PEN_HUE) & (saturation >= BLUE_PEN_MIN_SATURATION)
    red_hue = _in_hue(hue, *RED_PEN_HUES[0]) | _in_hue(hue, *RED_PEN_HUES[1])
    red = red_hue & (saturation >= RED_PEN_MIN_SATURATION)
    return green | blue | red


def _block_mean(mask: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Mean over each (height, width) block of a (rows*height, cols*width) array: (rows, cols)."""
    height, width = block
    rows, cols = mask.shape[0] // height, mask.shape[1] // width
    blocks = mask[: rows * height, : cols * width].reshape(rows, height, cols, width)
    return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


class TissueDetector(Protocol):
    """Per-block tissue fraction and decision for an image of (height, width)-pixel tiles."""

    name: ClassVar[str]

    def detect(self, rgb: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(tissue fraction, is tissue), each of shape (rows, cols)."""
        ...


@dataclass(frozen=True)
class OtsuTissueDetector:
    """Otsu on saturation; a tile is tissue when at least `min_tissue` of it is tissue."""

    min_saturation: int = 25
    min_tissue: float = 0.05
    name: ClassVar[str] = "otsu"

    def pixel_mask(self, rgb: np.ndarray) -> np.ndarray:
        """Boolean tissue mask of an RGB uint8 image."""
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        saturation = cv2.medianBlur(hsv[..., 1], 3)
        otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(otsu, self.min_saturation)
        return (saturation > threshold) & ~pen_mask(hsv)

    def detect(self, rgb: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        fraction = _block_mean(self.pixel_mask(rgb), block)
        return fraction, fraction >= self.min_tissue


@dataclass(frozen=True)
class HistogramTissueDetector:
    """Afshari & Tizhoosh's three-bin grey histogram rule."""

    a: int = 200
    b: int = 220
    max_ratio: float = 10.0
    name: ClassVar[str] = "histogram"

    def detect(self, rgb: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        ink = pen_mask(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
        dark = _block_mean((grey <= self.a) & ~ink, block)  # bin 1
        bright = _block_mean((grey > self.b) | ink, block)  # bin 3, ink counted as glass
        fraction = 1.0 - bright
        ratio = bright / np.maximum(dark, np.finfo(np.float32).tiny)
        return fraction, ratio <= self.max_ratio


DETECTORS: dict[str, type[OtsuTissueDetector] | type[HistogramTissueDetector]] = {
    OtsuTissueDetector.name: OtsuTissueDetector,
    HistogramTissueDetector.name: HistogramTissueDetector,
}


def make_detector(name: str, **params: float) -> TissueDetector:
    """A tissue detector by name (`otsu` or `histogram`), with optional parameters."""
    try:
        cls = DETECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown tissue method {name!r}; choose from {sorted(DETECTORS)}"
        ) from None
    return cls(**params)


def is_tissue(rgb: np.ndarray, detector: TissueDetector) -> bool:
    """Whether one tile, read whole, holds tissue."""
    return bool(detector.detect(rgb, block=rgb.shape[:2])[1][0, 0])


# A patch image archived or searched by must be at least this many pixels on each side
# (smaller ones, scaled up to the encoder's input, are embedded as blur; IDC holds 50 x 1 px
# edge patches: a group loses them, named), and its grey levels must vary by at least this
# standard deviation (0-255): a flat image (blank, white, black, transparent) holds no tissue.
MIN_PATCH_SIDE = 16
MIN_CONTRAST = 2.0


def blank_reason(rgb: np.ndarray) -> str | None:
    """Why an image holds no tissue at all (one flat colour), or None."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if float(grey.std()) < MIN_CONTRAST:
        colour = ", ".join(str(round(c)) for c in rgb.reshape(-1, 3).mean(axis=0))
        return (
            f"no tissue: the image is one flat colour (RGB {colour}; grey levels vary by "
            f"{grey.std():.1f}, under the {MIN_CONTRAST:g} an image needs)"
        )
    return None


def patch_reason(rgb: np.ndarray) -> str | None:
    """Why an image cannot be a patch (too small, or no tissue), or None."""
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_PATCH_SIDE:
        return f"the image is {w}x{h} px, under the {MIN_PATCH_SIDE} px a patch needs on each side"
    return blank_reason(rgb)
