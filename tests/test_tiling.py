from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from data_paths import CMU, KIDNEY, TCGA

from histosearch import open_slide, read_tiles, tile_slide
from histosearch.tiling import save_overlay


@pytest.mark.parametrize("mag", [1.25, 2.5, 5, 10, 20])
def test_grid_matches_the_slide_dimensions(mag: float):
    with open_slide(CMU) as slide:
        grid = tile_slide(slide, mag)
    w, h = int(2220 * mag / 20), int(2967 * mag / 20)
    assert (grid.rows, grid.cols) == (h // 224, w // 224)
    assert grid.mpp == pytest.approx(0.499 * 20 / mag)
    assert len(grid.coords) == grid.rows * grid.cols == grid.n_tissue + grid.n_background
    if len(grid):
        span = 224 * 20 / mag
        assert grid.coords[-1].tolist() == [
            round((grid.cols - 1) * span),
            round((grid.rows - 1) * span),
        ]


@pytest.mark.parametrize("method", ["otsu", "histogram"])
def test_tissue_kept_and_glass_dropped(method: str):
    with open_slide(CMU) as slide:
        grid = tile_slide(slide, 20, tissue=method)
        tiles = list(read_tiles(slide, grid))
    assert 50 < grid.n_tissue < 90 and grid.n_background > 30
    means = np.array([tile.mean() for tile in tiles])
    assert len(tiles) == grid.n_tissue and tiles[0].shape == (224, 224, 3)
    # the top-left corner of CMU-1 is glass, the kept tiles are stained
    assert not grid.is_tissue[0]
    assert means.mean() < 215


def test_mostly_blank_kidney_keeps_few_tiles():
    with open_slide(KIDNEY, objective_power=20) as slide:
        grid = tile_slide(slide, 20)
    assert (grid.rows, grid.cols) == (4, 6)
    assert grid.n_tissue <= 3 < grid.n_background


def test_multi_level_slide_reads_tiles_from_the_right_level():
    with open_slide(TCGA, objective_power=20) as slide:
        grid = tile_slide(slide, 10)
        assert slide.best_level(grid.downsample) == 1
        assert (grid.rows, grid.cols) == (1783 // 224, 2221 // 224)
        assert grid.n_tissue > 20


def test_csv_and_overlay(tmp_path: Path):
    with open_slide(CMU) as slide:
        grid = tile_slide(slide, 5)
        grid.to_csv(tmp_path / "tiles.csv")
        save_overlay(slide, grid, tmp_path / "tiles.png")
    rows = list(csv.DictReader((tmp_path / "tiles.csv").open()))
    assert len(rows) == 6
    assert rows[1]["x"] == "896" and rows[1]["col"] == "1" and rows[1]["magnification"] == "5"
    assert sum(int(r["is_tissue"]) for r in rows) == grid.n_tissue
    assert (tmp_path / "tiles.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles.csv", "tiles.png"]  # no temp files
