"""Mosaics (issue 22): a Yottixel subset of each slide's tissue tiles, at index and query time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_paths import CMU, TCGA
from typer.testing import CliRunner

from histosearch import Archive, Searcher
from histosearch.cli import app
from histosearch.mosaic import choose_mosaic, mosaic_size, mosaic_tiles, parse_mosaic
from histosearch.slide import open_slide
from histosearch.tiling import tile_slide

runner = CliRunner()
# color-histogram: fast on this CPU; 20x so that the small real slides have tens of tiles
INDEX = ["--encoder", "color-histogram", "--mag", "20", "--reduction", "none"]
INDEX += ["--objective-power", "20"]  # the TCGA slide records no resolution


def test_mosaic_settings_are_parsed_and_bad_ones_refused():
    assert [parse_mosaic(t) for t in ("16", " ALL ", "5%", "12.50%")] == [
        "16",
        "all",
        "5%",
        "12.5%",
    ]
    for bad in ("0", "-3", "0%", "150%", "some", "1.5"):
        with pytest.raises(ValueError, match="mosaic"):
            parse_mosaic(bad)
    assert [mosaic_size(m, 200) for m in ("all", "16", "5%", "1000", "0.1%")] == [
        200,
        16,
        10,
        200,
        1,
    ]


def _bands() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 30 x 36 grid in nine colour bands of 4 x 30 tiles: colours, positions, band."""
    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.arange(36 * 30), 30)
    band = rows // 4
    colours = np.eye(9)[band] + rng.normal(0, 0.02, (len(band), 9))
    return colours, np.stack([cols, rows], axis=1) * 224, band


def test_choose_mosaic_spreads_over_colours_and_space_deterministically():
    colours, positions, band = _bands()
    picks = choose_mosaic(colours, positions, 27)
    assert len(picks) == len(set(picks.tolist())) == 27
    assert np.array_equal(picks, choose_mosaic(colours, positions, 27))
    # each colour cluster gets its share of the 27 by its size: 3 each
    assert np.bincount(band[picks]).tolist() == [3] * 9
    # spread within a cluster: its three picks far apart along its 4 x 30 strip
    for value in range(9):
        mine = positions[picks[band[picks] == value]] / 224
        gaps = np.linalg.norm(mine[:, None] - mine[None], axis=2)[np.triu_indices(3, 1)]
        assert gaps.min() >= 8, gaps
    # uneven clusters: a share by size, at least one each
    weights = np.bincount(band[choose_mosaic(colours[band < 3], positions[band < 3], 2)])
    assert weights.sum() == 2 and weights.max() == 1
    assert np.array_equal(choose_mosaic(colours, positions, 2000), np.arange(len(band)))


def test_mosaic_of_a_real_slide(caplog):
    with open_slide(CMU) as slide:
        grid = tile_slide(slide, 20, 224)
        picks = mosaic_tiles(slide, grid, "16")
        assert len(picks) == len(set(picks.tolist())) == 16 and picks.max() < grid.n_tissue == 66
        assert np.array_equal(picks, mosaic_tiles(slide, grid, "16"))
        assert len(mosaic_tiles(slide, grid, "10%")) == 7
        assert np.array_equal(mosaic_tiles(slide, grid, "100"), np.arange(66))
    assert "mosaic of 100 tiles asks for more than its 66 tissue tiles" in caplog.text


@pytest.fixture(scope="module")
def mosaic_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mosaic") / "a"
    result = runner.invoke(
        app, ["index", str(CMU), str(TCGA), "--archive", str(root), "--mosaic", "16", *INDEX]
    )
    assert result.exit_code == 0, result.output
    return root


def test_archive_with_a_mosaic_stores_and_searches_16_tiles(mosaic_archive: Path):
    with Archive(mosaic_archive) as archive:
        assert archive.settings["mosaic"] == "16"
        assert [r.n_patches for r in archive.slides()] == [16, 16]
        tcga = archive.slides()[1].id
        searcher = Searcher(archive)
        # a query file is summarised by the same mosaic, so it matches its own slide exactly
        result = searcher.search(CMU, k=2, exclude=[])
        assert len(result.query.tiles) == 16
        assert [m.record.name for m in result.slides] == [CMU.name, TCGA.name]
        assert result.slides[0].similarity == pytest.approx(1.0, abs=1e-3)
        exact = searcher.search(CMU, k=2, exclude=[], exact=True)
        assert [(m.record.id, round(m.similarity, 6)) for m in exact.slides] == [
            (m.record.id, round(m.similarity, 6)) for m in result.slides
        ]
    result = runner.invoke(
        app, ["search", CMU.name, "--archive", str(mosaic_archive), "-k", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    (hit,) = json.loads(result.output)["results"]
    assert hit["slide_id"] == tcga


def test_other_mosaic_or_bad_mosaic_refused(mosaic_archive: Path, tmp_path: Path):
    result = runner.invoke(
        app, ["index", str(CMU), "--archive", str(mosaic_archive), "--mosaic", "5%", *INDEX]
    )
    assert result.exit_code != 0 and "mosaic 5% (archive: 16)" in str(result.exception)
    result = runner.invoke(
        app, ["index", str(CMU), "--archive", str(tmp_path / "b"), "--mosaic", "0", *INDEX]
    )
    assert result.exit_code == 2 and "mosaic '0'" in result.output
    assert not (tmp_path / "b").exists()
