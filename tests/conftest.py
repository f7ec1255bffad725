"""Shared fixtures: the real data in ../shared/data, never copied into the repository."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from data_paths import CMU, DATA, LC, write_manifest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not DATA.is_dir():
        raise pytest.UsageError(f"the shared data folder is missing: {DATA}")


@pytest.fixture(scope="session")
def cmu_pixels() -> np.ndarray:
    """Level-0 RGB pixels of the real CMU-1 small region."""
    from histosearch import open_slide

    with open_slide(CMU) as slide:
        return slide.read_scaled((0, 0), slide.dimensions, 1.0)


@pytest.fixture(scope="session")
def ome_tiff(tmp_path_factory: pytest.TempPathFactory, cmu_pixels: np.ndarray) -> Path:
    """An OME-TIFF pyramid (3 levels in SubIFDs, 0.499 um/px) written from real CMU-1 pixels."""
    path = tmp_path_factory.mktemp("ome") / "cmu-1.ome.tif"
    options = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
    metadata = {"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499}
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(cmu_pixels, subifds=2, metadata=metadata, **options)
        level = cmu_pixels
        for _ in range(2):
            level = cv2.resize(
                level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
            tiff.write(level, subfiletype=1, **options)
    return path


# -- histosearch serve (tests/test_server.py, tests/test_browser.py) ---------------------------


@pytest.fixture(scope="session")
def served_archive(tmp_path_factory: pytest.TempPathFactory, ome_tiff: Path) -> Path:
    """A small real archive: 2 LC25000 source tiles per class (patch groups), the CMU-1 SVS
    (OpenSlide) and the same pixels as an OME-TIFF (tiffslide), at 5x."""
    from data_paths import LC, write_manifest

    from histosearch import Archive, ArchiveSettings

    root = tmp_path_factory.mktemp("served")
    manifest = write_manifest(root / "lc25000.csv", LC, "group", per_class=2)
    archive = Archive.create(
        root / "archive",
        ArchiveSettings(encoder="efficientnet-lite0-imagenet", magnification=5.0, tile_size=224),
    )
    try:
        archive.add([manifest, CMU, ome_tiff], group_by="group")
    finally:
        archive.close()
    return root / "archive"


@pytest.fixture(scope="session")
def lc_cmu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `lc.csv` (3 LC25000 source tiles per class, grouped) and `archive/`,
    those 9 groups and the CMU-1 slide indexed with the colour histogram reduced to 32-d.
    Tests read it or copy it; none changes it."""
    from histosearch import Archive, ArchiveSettings

    root = tmp_path_factory.mktemp("lc-cmu")
    manifest = write_manifest(root / "lc.csv", LC, "group", 3)
    settings = ArchiveSettings(encoder="color-histogram", n_features=32)
    with Archive.create(root / "archive", settings) as archive:
        report = archive.add([manifest, CMU], group_by="group")
        assert report.added == 10 and not report.failures
    return root
