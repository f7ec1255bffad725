"""Archives that were interrupted, damaged or written by two processes: a clear message naming
the file and `histosearch check`, never wrong results; check --repair mends what is derived."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from data_paths import CMU, LC, write_manifest
from typer.testing import CliRunner

from histosearch import (
    Archive,
    ArchiveError,
    ArchiveSettings,
    HistosearchError,
    Searcher,
    SearchError,
)
from histosearch.archive.archive import check_archive
from histosearch.cli import app

runner = CliRunner()
# A patch of a group the archive does not hold: a query that must be embedded and reduced.
OUTSIDE = LC / (LC / "manifest.csv").read_text().splitlines()[-1].split(",")[0]
SETTINGS = ArchiveSettings(encoder="color-histogram", n_features=32)


def results(archive_dir: Path) -> dict:
    """Every slide's top-3 slides and top-3 patches, as names and rounded similarities."""
    with Archive.open(archive_dir) as archive:
        searcher = Searcher(archive)
        found = {}
        for record in archive.slides():
            for mode in ("slides", "patches"):
                hits = searcher.search(record.id, k=3, mode=mode).to_dict()["results"]
                found[record.name, mode] = [(h["slide"], round(h["similarity"], 4)) for h in hits]
        return found


@pytest.fixture
def copy(lc_cmu: Path, tmp_path: Path) -> Path:
    target = tmp_path / "archive"
    shutil.copytree(lc_cmu / "archive", target)
    return target


def test_a_killed_first_batch_is_refused_then_finished_by_the_next_index(lc_cmu, copy):
    expected = results(lc_cmu / "archive")
    # the state of a run killed after the last catalog row, before the store and index:
    # the slides are catalogued, embedded, not searchable
    db = sqlite3.connect(copy / "catalog.sqlite")
    with db:
        db.execute("UPDATE slides SET row_start = NULL")
    db.close()
    for derived in [*copy.glob("store/*"), *copy.glob("*-0.*")]:
        derived.unlink()
    with Archive.open(copy) as archive, pytest.raises(SearchError, match="not searchable"):
        Searcher(archive).search(1)
    done = runner.invoke(
        app,
        [
            "index",
            str(lc_cmu / "lc.csv"),
            str(CMU),
            "--archive",
            str(copy),
            "--group-by",
            "group",
            "--encoder",
            "color-histogram",
            "--n-features",
            "32",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "added 0" in done.output and "10 already there" in done.output
    assert results(copy) == expected


def test_a_missing_or_behind_index_and_an_uncommitted_store_tail(lc_cmu, copy):
    expected = results(lc_cmu / "archive")
    # rows appended to the store by a killed add, never committed: ignored by readers
    with (copy / "store" / "vectors-0.f16").open("ab") as file:
        file.write(b"\x00" * 64 * 7)
    assert results(copy) == expected
    (copy / "index-0.faiss").unlink()
    with Archive.open(copy) as archive:
        searcher = Searcher(archive)
        assert searcher.search(1, mode="slides", exact=True).slides  # the full scan needs none
        for mode in ("slides", "patches"):  # the shortlist and patch search do
            with pytest.raises(ArchiveError, match=r"index-0.faiss: the patch index is missing"):
                searcher.search(1, mode=mode)
    problems, _ = check_archive(copy)
    assert [p.reason for p in problems if "index" in p.path] and not problems[0].repaired
    problems, _ = check_archive(copy, repair=True)
    assert all(p.repaired for p in problems)
    assert results(copy) == expected
    assert check_archive(copy) == ([], check_archive(copy)[1])


@pytest.mark.parametrize(
    "damage",
    [
        "delete-feature-file",
        "truncate-feature-file",
        "truncate-store",
        "garbage-reducer",
        "garbage-index",
        "empty-catalog",
        "half-catalog",
    ],
)
def test_damage_is_named_and_check_repair_mends_it(lc_cmu, copy, damage):
    feature = sorted((copy / "features").glob("*.h5"))[0]
    if damage == "delete-feature-file":
        feature.unlink()
    elif damage == "truncate-feature-file":
        feature.write_bytes(feature.read_bytes()[:500])
    elif damage == "truncate-store":
        store = copy / "store" / "vectors-0.f16"
        store.write_bytes(store.read_bytes()[:1000])
    elif damage == "garbage-reducer":
        (copy / "reducer-0.npz").write_bytes(b"not a numpy file" * 10)
    elif damage == "garbage-index":
        (copy / "index-0.faiss").write_bytes(b"\x01" * 100)
    elif damage == "empty-catalog":
        (copy / "catalog.sqlite").write_bytes(b"")
    else:
        data = (copy / "catalog.sqlite").read_bytes()
        (copy / "catalog.sqlite").write_bytes(data[: len(data) // 2])

    def invoke(*args: str) -> tuple[int, str]:
        """The exit code and output of a command run in this process as `histosearch` runs
        it: `cli.main` ends a HistosearchError with its one line, anything else is a bug."""
        done = runner.invoke(app, [*args, "--archive", str(copy)])
        error = done.exception
        if isinstance(error, HistosearchError):
            assert str(copy) in str(error), (damage, args, str(error))  # names the file
            return error.exit_code, str(error)
        assert error is None or isinstance(error, SystemExit), (damage, args, repr(error))
        return done.exit_code, done.output

    codes = [
        invoke("search", "1", "--mode", "patches")[0],
        invoke("search", str(OUTSIDE), "--mode", "patches")[0],
        invoke("check")[0],
    ]
    assert codes[-1] == 1  # check always finds it
    if damage != "delete-feature-file" and damage != "truncate-feature-file":
        assert 1 in codes[:2]  # the search store's damage stops a search, named
    code, output = invoke("check", "--repair")
    lost = damage in ("delete-feature-file", "truncate-feature-file")
    # a slide without its features is taken out, and said not to be repaired (exit 1)
    assert code == lost, output
    assert "repaired" in output
    assert ("not repaired" in output and "again" in output) == lost, output
    with Archive.open(copy) as archive:
        assert len(archive.slides()) == 10 - lost
        assert Searcher(archive).search(archive.slides()[0].id, k=3).slides
    if damage in ("empty-catalog", "half-catalog"):
        assert list(copy.glob("catalog.sqlite*.damaged"))  # kept, never deleted


def test_one_writer_at_a_time(lc_cmu, copy):
    with Archive.open(copy) as archive, archive.writing():
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "histosearch.cli",
                "index",
                str(CMU),
                "--archive",
                str(copy),
                "--encoder",
                "color-histogram",
                "--n-features",
                "32",
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert f"archive is being written by process {__import__('os').getpid()}" in done.stderr
        # readers are not blocked by a writer
        assert Searcher(archive).search(1, k=2).slides
    assert not (copy / ".writer.pid").exists()


def test_concurrent_searches_equal_serial_ones(lc_cmu):
    with Archive.open(lc_cmu / "archive") as archive:
        searcher = Searcher(archive)
        queries = [(r.id, mode) for r in archive.slides() for mode in ("slides", "patches")]
        serial = [searcher.search(q, k=3, mode=m).to_dict() for q, m in queries]
        with ThreadPoolExecutor(8) as pool:
            parallel = list(
                pool.map(lambda qm: searcher.search(qm[0], k=3, mode=qm[1]).to_dict(), queries)
            )
        assert parallel == serial


def test_searches_during_an_add_see_only_committed_slides(lc_cmu, tmp_path):
    archive_dir = tmp_path / "growing"
    first = write_manifest(tmp_path / "first.csv", LC, "group", 2)
    more = write_manifest(tmp_path / "more.csv", LC, "group", 6)
    with Archive.create(archive_dir, SETTINGS) as archive:
        archive.add([first], group_by="group")
    seen, errors = set(), []
    stop = threading.Event()

    def search_loop() -> None:
        with Archive.open(archive_dir) as reader:
            searcher = Searcher(reader)
            while not stop.is_set():
                try:
                    result = searcher.search(1, k=50)
                    names = {hit.record.name for hit in result.slides}
                    committed = {r.name for r in reader.slides() if r.row_start is not None}
                    assert names <= committed
                    seen.add(len(names))
                except Exception as error:
                    errors.append(error)

    thread = threading.Thread(target=search_loop)
    thread.start()
    with Archive.open(archive_dir) as archive:
        report = archive.add([more], group_by="group")
    stop.set()
    thread.join()
    # groups are keyed by their manifest: the second one's 6 groups per class are all new
    assert not errors and report.added == 18 and seen
    with Archive.open(archive_dir) as archive:
        assert len(Searcher(archive).search(1, k=50).slides) == 23
