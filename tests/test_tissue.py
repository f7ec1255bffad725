from __future__ import annotations

import cv2
import numpy as np
import pytest
from data_paths import LABELLED_TILES
from PIL import Image

from histosearch.bench.tissue import tissue_accuracy
from histosearch.tissue import (
    HistogramTissueDetector,
    OtsuTissueDetector,
    is_tissue,
    make_detector,
    pen_mask,
)


def _tile(name: str) -> np.ndarray:
    return np.asarray(Image.open(LABELLED_TILES / name).convert("RGB"))


@pytest.mark.parametrize("name", ["otsu", "histogram"])
def test_default_detectors_on_the_labelled_tiles(name: str):
    accuracy, wrong = tissue_accuracy(LABELLED_TILES, make_detector(name))
    # 32 of 34: the misses are a near-blank tile named as tissue and a dark purple ink stroke
    assert accuracy >= 32 / 34, wrong
    assert set(wrong) <= {"liver-level2-38626-13514-39426-14315.png", "no-tissue-red-pen.png"}


def test_green_pen_is_not_tissue():
    tile = _tile("no-tissue-green-pen.png")
    assert pen_mask(cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)).mean() > 0.5
    for detector in (OtsuTissueDetector(), HistogramTissueDetector()):
        assert not is_tissue(tile, detector)
    # the same ink over tissue leaves the tissue counted
    assert is_tissue(_tile("medium-nuclei-score-green-pen-level1.png"), OtsuTissueDetector())


def test_histogram_rule_bins_and_ratio():
    # 2x1 tiles of 4 px: left has 1 dark, 1 mid, 2 bright pixels; right is all bright
    grey = np.array([[50, 210, 250, 250, 250, 250, 250, 250]], np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    fraction, keep = HistogramTissueDetector(a=200, b=220, max_ratio=2.0).detect(rgb, (1, 4))
    assert fraction.tolist() == [[0.5, 0.0]]
    assert keep.tolist() == [[True, False]]  # ratio 2/1 <= 2; 4/0 is background
    _, keep = HistogramTissueDetector(a=200, b=220, max_ratio=1.5).detect(rgb, (1, 4))
    assert keep.tolist() == [[False, False]]


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown tissue method 'magic'"):
        make_detector("magic")
