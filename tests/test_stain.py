from __future__ import annotations

import numpy as np
import pytest
from data_paths import LABELLED_TILES, TARGET
from PIL import Image
from skimage.color import rgb2lab

from histosearch import MacenkoNormalizer, ReinhardNormalizer, StainError


@pytest.fixture(scope="module")
def target() -> np.ndarray:
    return np.asarray(Image.open(TARGET).convert("RGB"))


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return np.asarray(
        Image.open(LABELLED_TILES / "medium-nuclei-score-level1-2.png").convert("RGB")
    )


def test_reinhard_matches_the_target_lab_statistics(target, tile):
    out = ReinhardNormalizer().fit(target).transform(tile)
    assert out.shape == tile.shape and out.dtype == np.uint8
    lab_out, lab_target = rgb2lab(out), rgb2lab(target)
    assert np.allclose(lab_out.mean(axis=(0, 1)), lab_target.mean(axis=(0, 1)), atol=0.5)
    assert np.allclose(lab_out.std(axis=(0, 1)), lab_target.std(axis=(0, 1)), atol=0.5)
    assert np.abs(rgb2lab(tile).mean(axis=(0, 1)) - lab_target.mean(axis=(0, 1))).max() > 5


def _mean_ab(rgb: np.ndarray) -> np.ndarray:
    return rgb2lab(rgb)[..., 1:].mean(axis=(0, 1))


def test_macenko_moves_the_tile_towards_the_target_colours(target, tile):
    out = MacenkoNormalizer().fit(target).transform(tile)
    assert out.shape == tile.shape and out.dtype == np.uint8
    assert np.linalg.norm(_mean_ab(out) - _mean_ab(target)) < np.linalg.norm(
        _mean_ab(tile) - _mean_ab(target)
    )


def test_stain_errors_are_clear(target):
    blank = np.full((64, 64, 3), 245, np.uint8)
    with pytest.raises(StainError, match="too little stained tissue in the image"):
        MacenkoNormalizer().fit(target).transform(blank)
    with pytest.raises(StainError, match="too little stained tissue in the target"):
        MacenkoNormalizer().fit(blank)
    with pytest.raises(StainError, match="fit the normaliser"):
        ReinhardNormalizer().transform(target)
