from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from data_paths import CMU, IDC, LC, TCGA, WSI, write_manifest
from typer.testing import CliRunner

from histosearch.archive.archive import Archive, ArchiveError, ArchiveSettings
from histosearch.archive.upkeep import derived_problems
from histosearch.cli import app
from histosearch.search.ranking import Query, excluded_slides
from histosearch.search.upkeep import load_calibration, load_patch_index, load_sketches

runner = CliRunner()


@pytest.fixture(scope="module")
def lc_archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lc")
    manifest = write_manifest(root / "lc.csv", LC, "group", 3)
    result = runner.invoke(
        app,
        [
            "index",
            str(manifest),
            "--archive",
            str(root / "archive"),
            "--group-by",
            "group",
            "--mag",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    return root / "archive"


def test_catalog_and_hdf5_layout(lc_archive: Path):
    with Archive(lc_archive) as archive:
        records = archive.slides()
        assert len(records) == 9 and {r.label for r in records} == {
            "lung_aca",
            "lung_n",
            "lung_scc",
        }
        assert archive.settings["encoder"] == "efficientnet-lite0-imagenet"
        assert archive.settings["reduction"] == "pca" and archive.settings["n_features"] == "128"
        record = records[0]
    # plain h5py reads the CLAM/TRIDENT layout
    with h5py.File(lc_archive / record.feature_file, "r") as h5:
        assert h5["features"].dtype == np.float16 and h5["features"].shape == (
            record.n_patches,
            1280,
        )
        assert h5["coords"].shape == (record.n_patches, 2)
        assert len(h5["paths"]) == record.n_patches
        assert h5.attrs["encoder"] == "efficientnet-lite0-imagenet"
    assert not list(lc_archive.rglob("*.tmp"))


def test_slide_search_ranks_same_class_first_and_excludes_itself(lc_archive: Path, tmp_path: Path):
    with Archive(lc_archive) as archive:
        query = next(r for r in archive.slides() if r.label == "lung_n")
    result = runner.invoke(
        app,
        [
            "search",
            query.name,
            "--archive",
            str(lc_archive),
            "-k",
            "3",
            "--json",
            "--gallery",
            str(tmp_path / "g.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[: result.output.rindex("}") + 1])
    results = payload["results"]
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert query.name not in [r["slide"] for r in results]
    assert results[0]["label"] == "lung_n"
    assert all(0 <= r["similarity"] <= 1 for r in results)
    assert results[0]["similarity"] >= results[1]["similarity"] >= results[2]["similarity"]
    assert len(results[0]["matches"]) == query.n_patches  # a best match for every query patch
    assert (tmp_path / "g.png").stat().st_size > 20_000


def test_patch_search_of_an_indexed_patch_finds_it_unless_its_group_is_excluded(lc_archive: Path):
    with Archive(lc_archive) as archive:
        record = archive.slides()[0]
        patch = archive.read(record).paths[0]
    result = runner.invoke(
        app,
        ["search", patch, "--archive", str(lc_archive), "-k", "3", "--json", "--mode", "patches"],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(result.output)["results"]
    assert results[0]["patch"] == Path(patch).name and results[0]["similarity"] > 0.999
    result = runner.invoke(
        app,
        [
            "search",
            patch,
            "--archive",
            str(lc_archive),
            "-k",
            "3",
            "--json",
            "--exclude",
            "group",
            "--group",
            record.group,
        ],
    )
    results = json.loads(result.output)["results"]
    assert len(results) == 3 and record.group not in [r["group"] for r in results]


def test_exclusion_rules(tmp_path: Path):
    manifest = write_manifest(tmp_path / "idc.csv", IDC, "patient", 2)
    result = runner.invoke(
        app, ["index", str(manifest), "--archive", str(tmp_path / "a"), "--mag", "2.5"]
    )
    assert result.exit_code == 0, result.output
    with Archive(tmp_path / "a") as archive:
        records = archive.slides()
        assert len(records) == len(manifest.read_text().splitlines()) - 1  # one patch per entry
        query = records[0]
        same_patient = {r.id for r in records if r.patient == query.patient}
        assert excluded_slides(records, Query.of(query), ["slide"]) == {query.id}
        assert excluded_slides(records, Query.of(query), ["patient"]) == same_patient
        assert excluded_slides(records, Query.of(None), ["patient", "slide"]) == set()
        with pytest.raises(ValueError, match="unknown exclusion"):
            excluded_slides(records, Query.of(query), ["hospital"])
    result = runner.invoke(
        app,
        [
            "search",
            query.name,
            "--archive",
            str(tmp_path / "a"),
            "-k",
            "5",
            "--exclude",
            "patient",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert all(r["patient"] != query.patient for r in json.loads(result.output)["results"])


def test_incremental_add_and_mismatched_settings(tmp_path: Path):
    archive_dir = tmp_path / "wsi"
    result = runner.invoke(app, ["index", str(CMU), "--archive", str(archive_dir), "--mag", "5"])
    assert result.exit_code == 0, result.output
    first = (archive_dir / "index-0.faiss").stat().st_mtime_ns
    reducer = (archive_dir / "reducer-0.npz").read_bytes()
    result = runner.invoke(
        app,
        [
            "index",
            str(CMU),
            str(TCGA),
            "--objective-power",
            "20",
            "--archive",
            str(archive_dir),
            "--mag",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "added 1" in result.output and "1 already there" in result.output
    with Archive(archive_dir) as archive:
        assert [r.name for r in archive.slides()] == [CMU.name, TCGA.name]
        view = archive.view()
        index = load_patch_index(archive, view)
        assert index.ntotal == sum(r.n_patches for r in archive.slides()) == len(view.vectors)
        # the percentiles are measured again on the grown archive
        assert load_calibration(archive)["rows"] == len(view.vectors)
        assert [r.row_start for r in archive.slides()] == [0, archive.slides()[0].n_patches]
    assert (archive_dir / "index-0.faiss").stat().st_mtime_ns != first
    # growing appends: the reduction fit on the first slide stays as it was
    assert (archive_dir / "reducer-0.npz").read_bytes() == reducer
    result = runner.invoke(app, ["index", str(CMU), "--archive", str(archive_dir), "--mag", "10"])
    assert result.exit_code != 0 and "magnification 10 (archive: 5)" in str(result.exception)
    result = runner.invoke(
        app, ["search", str(CMU), "--archive", str(archive_dir), "--encoder", "resnet50-imagenet"]
    )
    assert "encoder resnet50-imagenet (archive: efficientnet-lite0-imagenet)" in str(
        result.exception
    )


def test_a_small_add_leaves_the_index_and_sketches_and_searches_add_its_rows(
    tmp_path: Path, monkeypatch
):
    """At 10^8 patches the index and the sketches are 7 GB: an add that grows the store by
    less than UNSAVED_SHARE does not rewrite them; the searches that load them add the rest."""
    # the groups differ in size: a share of 2 lets this small archive grow by a few of them
    monkeypatch.setattr("histosearch.search.upkeep.UNSAVED_SHARE", 2.0)
    archive_dir, big = tmp_path / "archive", ("index-0.faiss", "sketches-0.npz")

    def add(groups: int) -> None:
        # the first `groups` of each class: the slides already there are skipped
        manifest = write_manifest(tmp_path / "lc.csv", LC, "group", groups)
        command = ["index", str(manifest), "--archive", str(archive_dir), "--group-by", "group"]
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output

    add(4)  # 4 groups of each of the 3 classes: 12 slides
    saved = {name: (archive_dir / name).read_bytes() for name in big}
    add(5)  # 3 more slides
    assert {name: (archive_dir / name).read_bytes() for name in big} == saved
    with Archive(archive_dir) as archive:
        view = archive.view()
        assert len(view.records) == 15
        assert archive.derived_covers(archive_dir / "sketches-0.npz") == 12
        index = load_patch_index(archive, view)
        assert index.ntotal == len(view.vectors) and load_sketches(archive, view).n_slides == 15
        assert derived_problems(archive, view) == []  # check finds nothing to mend
        # a patch of an added slide finds itself
        first_new = int(view.offsets[12])
        sims, rows = index.search(np.asarray(view.vectors[first_new : first_new + 1]), 1)
        assert sims[0, 0] > 0.999 and rows[0, 0] >= first_new
    monkeypatch.setattr("histosearch.search.upkeep.UNSAVED_SHARE", 0.1)
    add(7)  # 6 more: the files lack 9 slides of 21, past the share, and are written again
    assert all((archive_dir / name).read_bytes() != saved[name] for name in big)
    with Archive(archive_dir) as archive:
        view = archive.view()
        assert len(view.records) == 21
        assert archive.derived_covers(archive_dir / "index-0.faiss") == len(view.vectors)
        assert archive.derived_covers(archive_dir / "sketches-0.npz") == 21


def test_bad_archives_and_queries(tmp_path: Path, lc_archive: Path):
    with pytest.raises(ArchiveError, match="no archive here"):
        Archive(tmp_path / "nothing")
    with (
        Archive.create(tmp_path / "empty", ArchiveSettings()) as archive,
        pytest.raises(ArchiveError, match="empty"),
    ):
        archive.all_features()
    cli = [sys.executable, "-m", "histosearch.cli"]
    done = subprocess.run(
        [
            *cli,
            "search",
            str(WSI / "histolab" / "broken.svs"),
            "--archive",
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "empty: the archive is empty" in done.stderr
    done = subprocess.run(
        [*cli, "search", str(WSI / "histolab" / "broken.svs"), "--archive", str(lc_archive)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "broken.svs: corrupt or unsupported" in done.stderr
    # a manifest that is not there: one line naming it, and no archive begun
    missing = tmp_path / "nope.csv"
    done = subprocess.run(
        [*cli, "index", str(missing), "--archive", str(tmp_path / "new")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{missing}: no such manifest" in done.stderr
    assert not (tmp_path / "new").exists()


def test_interrupted_index_resumes_without_duplicates(tmp_path: Path):
    # 300 single patches: embedded in runs of 128, each patch stored as its run finishes
    images = sorted((LC / "images" / "lung_n").glob("*.jpeg"))[:300]
    folder = tmp_path / "patches"
    folder.mkdir()
    for image in images:
        (folder / image.name).symlink_to(image)
    archive_dir = tmp_path / "archive"
    command = [
        sys.executable,
        "-m",
        "histosearch.cli",
        "index",
        str(folder),
        "--archive",
        str(archive_dir),
        "--workers",
        "0",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    catalog = archive_dir / "catalog.sqlite"
    deadline = time.monotonic() + 120
    count = 0
    while time.monotonic() < deadline and process.poll() is None:
        if catalog.exists():
            try:
                count = (
                    sqlite3.connect(catalog).execute("SELECT COUNT(*) FROM slides").fetchone()[0]
                )
            except sqlite3.OperationalError:
                count = 0
            if count >= 3:
                break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 3 <= count < 300, "the run must be killed midway"
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with Archive(archive_dir) as archive:
        records = archive.slides()
        assert len(records) == 300 and len({r.path for r in records}) == 300
        for record in records:
            assert archive.read(record).features.shape == (1, 1280)
        assert load_patch_index(archive, archive.view()).ntotal == 300
    assert not list(archive_dir.rglob("*.tmp"))


def test_l2_patch_index(tmp_path: Path):
    import faiss

    manifest = write_manifest(tmp_path / "lc.csv", LC, "group", 2)
    archive_dir = tmp_path / "archive"
    result = runner.invoke(
        app,
        [
            "index",
            str(manifest),
            "--archive",
            str(archive_dir),
            "--group-by",
            "group",
            "--index-metric",
            "l2",
            "--reduction",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    with Archive(archive_dir) as archive:
        index = load_patch_index(archive, archive.view())
        assert index.metric == "l2" and index.index.metric_type == faiss.METRIC_L2
        patch = archive.read(archive.slides()[0]).paths[0]
    result = runner.invoke(
        app, ["search", patch, "--archive", str(archive_dir), "-k", "2", "--json"]
    )
    hits = json.loads(result.output)["results"]
    # itself, re-embedded: only the float16 storage separates them
    assert hits[0]["patch"] == Path(patch).name and hits[0]["similarity"] > 0.99
    assert 0 < hits[1]["similarity"] < 1
