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


@pytest.mark.parametrize("path", [CMU, KIDNEY])
def test_kept_edges_cover_the_slide_padded_with_white(path: Path):
    with open_slide(path, objective_power=20) as slide:
        dropped = tile_slide(slide, 5, edges="drop")
        kept = tile_slide(slide, 5, edges="keep")
        w, h = slide.size_at(5)
        assert (kept.rows, kept.cols) == (-(-h // 224), -(-w // 224))
        assert dropped.margins == (w % 224, h % 224) and kept.margins == (0, 0)
        assert (
            kept.coords.reshape(kept.rows, kept.cols, 2)[: dropped.rows, : dropped.cols]
            .reshape(-1, 2)
            .tolist()
            == dropped.coords.tolist()
        )
        corner = next(read_tiles(slide, kept, kept.coords[-1:]))
        # white beyond the slide (the boundary pixel mixes both when the size is fractional)
        assert (corner[h % 224 + 1 :, :] == 255).all() and (corner[:, w % 224 + 1 :] == 255).all()
        assert (corner[: h % 224, : w % 224] != 255).any()


def test_the_tissue_left_out_by_the_floor_grid_is_reported():
    with open_slide(TCGA, objective_power=20) as slide:
        dropped = tile_slide(slide, 5)
        kept = tile_slide(slide, 5, edges="keep")
    # TCGA at 5x: 1110x891 px, a 3x4 grid leaves 214 and 219 px strips with tissue
    assert dropped.margins == (214, 219)
    assert 0.2 < dropped.untiled_tissue < 0.45
    assert "margins of 214 and 219 px not tiled (" in dropped.edge_note()
    assert kept.untiled_tissue == 0 and kept.n_tissue > dropped.n_tissue
    with pytest.raises(ValueError, match="edges must be one of drop, keep"):
        tile_slide(slide, 5, edges="pad")
