from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from bad_files import grey16_tiff, header_bomb_tiff, huge_png
from data_paths import CMU, KIDNEY, TARGET, TCGA, WSI
from PIL import Image

from histosearch import MagnificationError, SlideReadError, open_slide
from histosearch.slide import ImageSlide, OpenSlideSlide, TiffSlideSlide
from histosearch.slide import base as slide_base
from histosearch.slide import image as slide_image


def test_aperio_svs_knows_its_resolution():
    with open_slide(CMU) as slide:
        assert isinstance(slide, OpenSlideSlide)
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20
        for mag, size in [
            (20, (2220, 2967)),
            (10, (1110, 1483)),
            (5, (555, 741)),
            (2.5, (277, 370)),
            (1.25, (138, 185)),
        ]:
            assert slide.size_at(mag) == size
            assert slide.mpp_at(mag) == pytest.approx(0.499 * 20 / mag)


def test_region_at_lower_magnification_is_the_level0_region_resized(cmu_pixels):
    with open_slide(CMU) as slide:
        tile = slide.read_region((448, 896), (224, 224), 5)
    expected = cv2.resize(
        cmu_pixels[896 : 896 + 896, 448 : 448 + 896], (224, 224), interpolation=cv2.INTER_AREA
    )
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    assert np.array_equal(tile, expected)


def test_magnification_above_the_scan_is_refused():
    with open_slide(CMU) as slide, pytest.raises(MagnificationError, match="scanned at 20x"):
        slide.read_region((0, 0), (224, 224), 40)


def test_slide_without_resolution_needs_it_from_the_user():
    with open_slide(TCGA) as slide:
        assert slide.mpp is None and slide.objective_power is None
        with pytest.raises(MagnificationError, match="--objective-power"):
            slide.size_at(5)
    with open_slide(TCGA, objective_power=20) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.best_level(2.0) == 1  # level 1 is stored at 2.0005
        assert slide.size_at(10) == (2221, 1783)
        level1 = slide.handle.read_region((1000, 1000), 1, (224, 224))
        assert np.array_equal(
            slide.read_region((1000, 1000), (224, 224), 10), np.asarray(level1)[..., :3]
        )


def test_generic_pyramidal_tiff_ignores_screen_dpi():
    with open_slide(WSI / "openslide-python" / "boxes.tiff") as slide:
        assert slide.level_count == 4
        assert slide.mpp is None  # the file's 72 dpi is not a scan resolution
    with open_slide(WSI / "openslide-python" / "boxes.tiff", mpp=0.25) as slide:
        assert slide.objective_power == pytest.approx(40)
        assert slide.best_level(4.0) == 2
        assert slide.read_region((0, 0), (75, 62), 10).shape == (62, 75, 3)


def test_dicom_wsi_reads_through_openslide():
    with (
        open_slide(WSI / "openslide-python" / "boxes_0.dcm") as slide,
        open_slide(WSI / "openslide-python" / "small.svs") as svs,
    ):
        assert isinstance(slide, OpenSlideSlide)
        assert slide.handle.properties["openslide.vendor"] == "dicom"
        assert slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
        assert slide.read_region((0, 0), (16, 16), 20).shape == (16, 16, 3)
        assert svs.dimensions == slide.dimensions


def test_plain_tiff_that_openslide_refuses_reads_through_tifffile():
    with open_slide(KIDNEY, mpp=0.5) as slide:
        assert isinstance(slide, TiffSlideSlide)
        assert slide.dimensions == (1493, 901)
        assert slide.read_region((0, 0), (100, 100), 20).mean() > 200  # blank glass at the corner


def test_ome_tiff_pyramid_and_mpp(ome_tiff, cmu_pixels):
    with open_slide(ome_tiff) as slide:
        assert isinstance(slide, TiffSlideSlide)
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx(0.499)
        assert slide.best_level(4.0) == 2
        tile = slide.read_scaled((0, 0), (256, 256), 1.0)
    # JPEG round trip: close to the source pixels, not identical
    assert np.abs(tile.astype(int) - cmu_pixels[:256, :256]).mean() < 4


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_plain_images_are_one_level_slides(tmp_path: Path, suffix: str):
    path = tmp_path / f"target{suffix}"
    Image.open(TARGET).convert("RGB").save(path)
    with open_slide(path, mpp=0.5) as slide:
        assert isinstance(slide, ImageSlide)
        assert slide.dimensions == (1000, 1000)
        assert slide.read_region((500, 500), (224, 224), 10).shape == (224, 224, 3)
        # outside the image reads as white glass
        assert (slide.read_scaled((990, 990), (20, 20), 1.0)[15:, 15:] == 255).all()


def _truncated(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.svs"
    path.write_bytes(CMU.read_bytes()[: CMU.stat().st_size // 2])
    return path


def _truncated_dicom(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.dcm"
    path.write_bytes((WSI / "pathml" / "small_dicom.dcm").read_bytes()[:200_000])
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.svs"
    path.touch()
    return path


def _truncated_tail(tmp_path: Path) -> Path:
    path = tmp_path / "truncated-tail.svs"
    path.write_bytes(CMU.read_bytes()[: int(CMU.stat().st_size * 0.9)])
    return path


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "folder.svs"
    path.mkdir()
    return path


def _link_loop(tmp_path: Path) -> Path:
    path = tmp_path / "loop.svs"
    path.symlink_to(path.name)
    return path


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda tmp: WSI / "histolab" / "broken.svs", "corrupt or unsupported"),
        (lambda tmp: WSI / "openslide-python" / "unopenable.tiff", "Unsupported TIFF compression"),
        (_truncated_dicom, "truncated or corrupt DICOM"),
        (lambda tmp: WSI / "pathml" / "small_vectra.qptiff", "not a brightfield RGB image"),
        (lambda tmp: WSI / "pathml" / "smalltif.tif", "not a brightfield RGB image"),
        (lambda tmp: tmp / "missing.svs", "no such file"),
        (_empty, "empty"),
        (_truncated, "truncated: the file has 969,477 bytes"),
        (_truncated_tail, "truncated: .* image directory 2 is at byte"),
        (_directory, "is a directory, not a slide file"),
        (_link_loop, "symbolic link loop"),
        (header_bomb_tiff, "claims 200000x200000 px in 611,524 tiles but lists 1"),
        (grey16_tiff, r"not a brightfield RGB image \(MINISBLACK, 1 sample\(s\) of 16 bits"),
        (huge_png, "refused before decoding, too large"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, make_path, reason: str):
    path = make_path(tmp_path)
    with pytest.raises(SlideReadError, match=reason) as caught, open_slide(path) as slide:
        slide.thumbnail(512)
    assert str(path) in str(caught.value)


def test_copies_of_a_slide_read_identically(tmp_path: Path):
    copy = tmp_path / "copy.svs"
    shutil.copy(CMU, copy)
    with open_slide(CMU) as a, open_slide(copy) as b:
        assert np.array_equal(a.thumbnail(256), b.thumbnail(256))


def test_large_plain_images_are_refused_before_decoding(tmp_path: Path, monkeypatch):
    path = tmp_path / "target.png"
    shutil.copy(TARGET, path)
    monkeypatch.setattr(slide_image, "MAX_PLAIN_PIXELS", 999_999)
    with pytest.raises(SlideReadError, match=r"1000x1000 px .* over the 1 Mpx"):
        open_slide(path)


def test_flat_slides_too_large_for_an_overview_are_refused(monkeypatch):
    monkeypatch.setattr(slide_base, "MAX_OVERVIEW_PIXELS", 1_000_000)
    with pytest.raises(SlideReadError, match=r"its only level is 1493x901 px .* pyramidal TIFF"):
        open_slide(KIDNEY)


def test_jpeg_overviews_decode_at_a_fraction_of_the_size(tmp_path: Path):
    path = tmp_path / "target.jpg"
    Image.open(TARGET).convert("RGB").save(path, quality=95)
    with open_slide(path) as slide:
        assert slide.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        thumb = slide.thumbnail(125)
        assert list(slide._levels) == [3]  # level 0 never decoded
        full = slide.read_scaled((0, 0), (1000, 1000), 1.0)
    reduced = cv2.resize(full, (125, 125), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb.astype(int) - reduced).mean() < 6


def test_reader_warnings_name_the_file(tmp_path: Path, caplog):
    path = tmp_path / "odd.tif"
    with caplog.at_level("WARNING", logger="histosearch"), slide_base.reader_notes(path):
        logging.getLogger("tifffile").warning("<tifffile.TiffPages @8> invalid page offset 9")
        warnings.warn("Corrupt EXIF data", UserWarning, stacklevel=1)
    assert f"{path}: invalid page offset 9; Corrupt EXIF data" in caplog.text


def test_unreadable_files_are_named(tmp_path: Path, monkeypatch):
    path = tmp_path / "locked.svs"
    shutil.copy(CMU, path)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # root reads files whatever their mode
    with pytest.raises(SlideReadError, match=r"locked\.svs: permission denied"):
        open_slide(path)
