"""DICOM whole-slide files OpenSlide cannot open, read through wsidicom; and slides smaller
than one tile."""

from __future__ import annotations

import io
import math

import numpy as np
import pydicom
import pydicom.encaps
import pytest
from data_paths import WSI
from PIL import Image

from histosearch import NoTissueError, open_slide
from histosearch.embed.items import embed_file
from histosearch.encoders import create_encoder
from histosearch.slide import WsiDicomSlide
from histosearch.tiling import Tiling

SMALL_DICOM = WSI / "pathml" / "small_dicom.dcm"


@pytest.fixture(scope="module")
def small_dicom_frames() -> tuple[list[np.ndarray], int, int]:
    """The fixture's tiles decoded one by one, in the order the file stores them, and its
    grid (columns, rows)."""
    dataset = pydicom.dcmread(SMALL_DICOM)
    frames = pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=42)
    tiles = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames]
    columns = math.ceil(dataset.TotalPixelMatrixColumns / dataset.Columns)
    rows = math.ceil(dataset.TotalPixelMatrixRows / dataset.Rows)
    return tiles, columns, rows


def test_the_dicom_fixture_reads_through_wsidicom_as_its_tiles_say(small_dicom_frames, caplog):
    tiles, columns, rows = small_dicom_frames
    assert (columns, rows, len(tiles)) == (7, 6, 42)
    with caplog.at_level("WARNING", logger="histosearch"), open_slide(SMALL_DICOM) as slide:
        assert isinstance(slide, WsiDicomSlide)
        assert slide.dimensions == (3236, 2638) and slide.level_count == 1
        assert slide.mpp is None  # the file records no pixel spacing
        # The file states no tile positions; its tiles join up column by column.
        for column, row in [(0, 0), (1, 0), (0, 1), (3, 2), (5, 4)]:
            region = slide.read_scaled((500 * column, 500 * row), (500, 500), 1.0)
            assert np.abs(region.astype(int) - tiles[column * rows + row]).max() <= 1
        # the last column and row are cut at the pixel matrix's edge
        corner = slide.read_scaled((3000, 2500), (236, 138), 1.0)
        assert np.array_equal(corner, tiles[-1][:138, :236])
    assert "no ImageType" in caplog.text and "column by column" in caplog.text
    assert "no pixel spacing" in caplog.text


def test_the_dicom_fixture_tiles_at_a_given_resolution():
    with open_slide(SMALL_DICOM, mpp=0.5) as slide:
        assert slide.objective_power == pytest.approx(20)
        assert slide.size_at(5) == (809, 659)
        tile = slide.read_region((1000, 1000), (224, 224), 5)
        level0 = slide.read_scaled((1000, 1000), (896, 896), 1.0)
    assert tile.shape == (224, 224, 3)
    shrunk = np.asarray(Image.fromarray(level0).resize((224, 224), Image.Resampling.BOX))
    assert np.abs(tile.astype(int) - shrunk).mean() < 3


def test_a_slide_smaller_than_one_tile_says_so():
    encoder = create_encoder("color-histogram")
    # boxes_0.dcm: 16x16 px at 20x, read by OpenSlide (never by Pillow)
    with pytest.raises(NoTissueError, match=r"4x4 px at 5x, smaller than one tile of 224 px"):
        embed_file(WSI / "openslide-python" / "boxes_0.dcm", encoder, Tiling(5.0, 224))
