"""Bad slide files made from the real fixtures, shared by the reader and bad-input tests."""

import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from data_paths import TARGET
from PIL import Image


def header_bomb_tiff(folder: Path) -> Path:
    """A 500-byte tiled TIFF whose header claims 200,000 x 200,000 px."""
    path = folder / "bomb.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(256, 256))
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        for tag in ("ImageWidth", "ImageLength"):
            tiff.pages[0].tags[tag].overwrite(200_000)
    return path


def grey16_tiff(folder: Path) -> Path:
    """A tiled 16-bit grayscale TIFF made from real pixels (OpenSlide would open it)."""
    path = folder / "grey16.tif"
    grey = np.asarray(Image.open(TARGET).convert("L"), np.uint16) * 257
    tifffile.imwrite(path, grey, tile=(256, 256))
    return path


def huge_png(folder: Path) -> Path:
    """The real target PNG with its header edited to claim 100,000 x 100,000 px."""
    data = bytearray(TARGET.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = folder / "huge.png"
    path.write_bytes(bytes(data))
    return path
