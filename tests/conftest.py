"""Shared fixtures: the real data in ../shared/data, never copied into the repository."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from data_paths import CMU, DATA


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
