"""Plain images (PNG, JPEG, ...) as slides, and whole patches, through Pillow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from histosearch.errors import SlideReadError
from histosearch.slide.base import Slide, file_header, reader_notes, with_notes

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# Plain-image signatures: such a file is read by Pillow whatever its name says.
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
# A plain image (no random access, decoded whole) larger than this is refused before any
# decoding: Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, ~179 Mpx,
# ~540 MB of RGB), which a 13,000 x 13,000 px image still fits.
MAX_PLAIN_PIXELS = 2 * 89_478_485
# JPEG files decode at 1/2, 1/4 or 1/8 scale for little more than the cost of the smaller
# image (Pillow's draft mode): plain JPEGs get these as pyramid levels.
JPEG_DRAFT_SCALES = (1, 2, 4, 8)


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
            raise SlideReadError(path, with_notes(f"cannot read image: {reason}", notes)) from error


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
    file_header(path)
    with _decoding(path) as image:
        return np.array(_flatten(image))


def is_image(header: bytes) -> bool:
    """Whether a file's first bytes are those of a plain image."""
    return header.startswith(IMAGE_MAGIC) or (header[:4] == b"RIFF" and header[8:12] == b"WEBP")
