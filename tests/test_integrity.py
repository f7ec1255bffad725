"""Bytes that changed after they were written: every checksummed part of an archive (store rows,
feature files, reduction, patch index, calibration) is verified by `check`, refused by a
search that would rank on it, and rebuilt by `check --repair` from intact sources; a reindex
is never seen half-done by the searches running beside it."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from data_paths import CMU

from histosearch import Archive, ArchiveError, ArchiveSettings, Searcher
from histosearch.archive import folder
from histosearch.archive.archive import check_archive
from histosearch.archive.feedback import Mark, add_mark
from histosearch.search.upkeep import load_calibration

SETTINGS = ArchiveSettings(encoder="color-histogram", n_features=32)
FLIPS = 24  # sampled byte positions per file


@pytest.fixture
def copy(lc_cmu: Path, tmp_path: Path) -> Path:
    target = tmp_path / "archive"
    shutil.copytree(lc_cmu / "archive", target)
    return target


def results(archive: Archive) -> dict:
    """Every slide's top-3 slides and patches (names, rounded similarities, percentiles)."""
    searcher, found = Searcher(archive), {}
    for record in archive.slides():
        for mode in ("slides", "patches"):
            hits = searcher.search(record.id, k=3, mode=mode).to_dict()["results"]
            found[record.name, mode] = [
                (h["slide"], round(h["similarity"], 4), h["percentile"]) for h in hits
            ]
    return found


def flip(path: Path, position: int) -> None:
    """XOR one byte of a file in place (its size unchanged)."""
    with path.open("r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ 0x5A]))


def test_every_sampled_byte_flip_in_the_store_is_caught(copy):
    rng = np.random.default_rng(0)
    with Archive.open(copy) as archive:
        view = archive.view()
        searcher = Searcher(archive)
        for name, row_bytes in (("vectors-0.f16", 2 * archive.dim), ("coords-0.i32", 8)):
            path = copy / "store" / name
            for position in rng.choice(len(view.vectors) * row_bytes, FLIPS, replace=False):
                record = view.records[int(view.row_slide[position // row_bytes])]
                flip(path, position)
                problems = archive.check()
                assert [p.path for p in problems] == [str(copy / "store")], (name, position)
                assert f"of {record.name} (slide {record.id}) differ" in problems[0].reason
                # a search that reads those rows for its answer refuses, naming the slide
                with pytest.raises(ArchiveError, match=f"of {record.name} \\(slide"):
                    searcher.search(record.id, k=3)
                with pytest.raises(ArchiveError, match=f"of {record.name} \\(slide"):
                    searcher.search(view.records[0].id, k=3, exact=True)
                flip(path, position)
        assert archive.check() == []


def test_store_damage_is_rebuilt_from_the_feature_files(lc_cmu, copy):
    with Archive.open(lc_cmu / "archive") as archive:
        expected = results(archive)
    path = copy / "store" / "vectors-0.f16"
    for position in (5, 1000, path.stat().st_size - 3):
        flip(path, position)
    problems, _ = check_archive(copy, repair=True)
    assert problems and all(p.repaired and p.done for p in problems)
    with Archive.open(copy) as archive:
        assert archive.check() == [] and archive.generation == 1
        assert results(archive) == expected


def dataset_bytes(path: Path) -> list[int]:
    """The file offsets of every byte of a feature file's datasets (contiguous layout)."""
    with h5py.File(path, "r") as h5:
        spans = [(h5[n].id.get_offset(), h5[n].id.get_storage_size()) for n in h5]
    return [offset + i for offset, size in spans for i in range(size)]


def test_every_sampled_byte_flip_in_a_feature_file_is_caught(copy):
    rng = np.random.default_rng(1)
    with Archive.open(copy) as archive:
        record = archive.slides()[3]
        path = copy / record.feature_file
        # in its datasets, and anywhere (HDF5's own headers and heap: parsed damage there can
        # hang the library, so the whole file is checked before it is parsed)
        positions = [
            *rng.choice(dataset_bytes(path), FLIPS, replace=False),
            *rng.choice(path.stat().st_size, FLIPS, replace=False),
        ]
        searcher = Searcher(archive)
        for position in positions:
            flip(path, int(position))
            problems = archive.check()
            assert [p.path for p in problems] == [str(path)]
            assert f"feature file of {record.name} differ from the checksum" in problems[0].reason
            flip(path, int(position))
        # the reindex, which reads every feature file, refuses too
        flip(path, int(positions[0]))
        with pytest.raises(ArchiveError, match="differ from the checksum"):
            archive.reindex()
        assert searcher.search(record.id, k=2).slides  # the store itself is intact
        flip(path, int(positions[0]))
        assert archive.check() == []


def test_a_feature_file_swapped_for_another_slides_is_caught(copy):
    with Archive.open(copy) as archive:
        aca, scc = (
            next(r for r in archive.slides() if r.name.startswith(prefix))
            for prefix in ("lung_aca", "lung_scc")
        )
    shutil.copyfile(copy / aca.feature_file, copy / scc.feature_file)
    with Archive.open(copy) as archive:
        problems = archive.check()
        assert [p.path for p in problems] == [str(copy / scc.feature_file)]
        assert f"holds another slide ({aca.path})" in problems[0].reason
        # a reindex, which rebuilds from the feature files, refuses rather than rank on it
        with pytest.raises(ArchiveError, match=f"feature file of {scc.name} differ"):
            archive.reindex()
        problems = archive.check(repair=True)
        assert not problems[0].repaired and f"index {scc.path} again" in problems[0].done
        assert scc.id not in {r.id for r in archive.slides()}
        assert (copy / (scc.feature_file + ".damaged")).is_file()
        assert archive.check() == []
        hits = Searcher(archive).search(aca.id, k=3).slides
        assert scc.name not in [h.record.name for h in hits]


@pytest.mark.parametrize("stem", ["reducer", "index", "sketches", "calibration"])
def test_a_changed_or_deleted_derived_file_is_refused_then_rebuilt(lc_cmu, copy, stem):
    with Archive.open(lc_cmu / "archive") as archive:
        expected = results(archive)
    for damage in ("flip", "delete"):
        with Archive.open(copy) as archive:
            path = archive.path(stem, ".faiss" if stem == "index" else ".npz")
            if damage == "flip":
                flip(path, path.stat().st_size // 2)
            else:
                path.unlink()
            with pytest.raises(ArchiveError, match=path.name):
                Searcher(archive).search(1, k=3, mode="patches")
            problems = archive.check()
            assert any(p.path == str(path) for p in problems), problems
            assert all(p.repairable for p in problems)
            archive.check(repair=True)
            assert archive.check() == []
            assert results(archive) == expected  # percentiles too: none is null


def test_a_derived_file_replaced_while_it_is_checked_is_read_again(copy, monkeypatch):
    """A reader that opened a derived file just before a writer replaced it (the catalog then
    records only the new file's checksum) reads the new file, not the old one, nor a refusal."""
    real = folder.file_checksum
    replaced = []

    def checksum_then_replace(file):
        crc = real(file)
        if not replaced:
            replaced.append(crc)
            archive.write_derived(
                path, lambda f: np.savez(f, patches=np.zeros(1), slides=np.zeros(1), rows=7)
            )
        return crc

    with Archive.open(copy) as archive:
        path = archive.path("calibration", ".npz")
        before = int(load_calibration(archive)["rows"])
        monkeypatch.setattr(folder, "file_checksum", checksum_then_replace)
        assert int(load_calibration(archive)["rows"]) == 7 != before
        assert replaced  # the old file's bytes were checked, then found replaced


def test_repair_keeps_ids_and_marks_and_says_what_it_could_not(copy):
    with Archive.open(copy) as archive:
        ids = {r.path: r.id for r in archive.slides()}
        add_mark(archive.catalog, Mark("q", "slides", result_slide=7, relevant=True))
        marks = archive.catalog.marks()
    db = sqlite3.connect(copy / "catalog.sqlite")
    with db:
        db.execute("DROP TABLE slides")  # a catalog that lost its slides
    db.close()
    problems, _ = check_archive(copy, repair=True)
    assert problems[0].repaired and "1 relevance marks kept" in problems[0].done
    with Archive.open(copy) as archive:
        assert {r.path: r.id for r in archive.slides()} == ids
        assert archive.catalog.marks() == marks
        assert archive.check() == []
    # nothing left to rebuild from: said, not called repaired
    for feature in (copy / "features").glob("*.h5"):
        feature.write_bytes(b"")
    problems, description = check_archive(copy, repair=True)
    assert problems and not any(p.repaired for p in problems)
    assert description.startswith("0 slides")


def test_searches_during_a_reindex_are_all_answered_from_one_generation(lc_cmu, copy):
    with Archive.open(lc_cmu / "archive") as archive:
        expected = results(archive)
    answers, errors, done = [], [], threading.Event()

    def search() -> None:
        with Archive.open(copy) as archive:
            searcher = Searcher(archive)
            while not done.is_set():
                for mode in ("slides", "patches"):
                    try:
                        hits = searcher.search(2, k=3, mode=mode).to_dict()["results"]
                    except Exception as error:  # every refusal is a failure
                        errors.append(error)
                        continue
                    found = [(h["slide"], round(h["similarity"], 4), h["percentile"]) for h in hits]
                    answers.append((mode, found))

    thread = threading.Thread(target=search)
    thread.start()
    try:
        with Archive.open(copy) as archive:
            name = archive.get(2).name
            for _ in range(4):
                archive.reindex()
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert len(answers) > 4
    assert all(found == expected[name, mode] for mode, found in answers)


@pytest.fixture
def read_only(copy: Path) -> Path:
    """The archive copy, read-only: by permissions, or (as root, whom permissions do not stop)
    through a read-only bind mount."""
    if os.geteuid() != 0:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        yield copy
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return
    mount = copy.with_name("read-only")
    mount.mkdir()
    bind = ["mount", "--bind", str(copy), str(mount)]
    if subprocess.run(bind, capture_output=True).returncode:
        pytest.skip("root without mount rights: no way to make a folder read-only here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_index_on_a_read_only_archive_is_one_line(read_only):
    cli = [sys.executable, "-m", "histosearch.cli", "index", str(CMU), "--archive", str(read_only)]
    done = subprocess.run(
        [*cli, "--encoder", "color-histogram", "--n-features", "32"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write to the archive" in lines[0], done.stderr
    with Archive.open(read_only) as archive:  # searches still read it
        assert Searcher(archive).search(1, k=2).slides


def test_a_server_under_load_answers_every_search_through_reindexes(copy):
    import httpx

    from histosearch.bench.serve import running_server

    statuses, answers, done = [], [], threading.Event()

    def client(mode: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not done.is_set():
                response = http.post("/api/search", json={"slide": 2, "k": 3, "mode": mode})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    hits = response.json()["results"]
                    answers.append((mode, [(h["slide"], round(h["similarity"], 4)) for h in hits]))

    with running_server(copy) as (url, _):
        threads = [threading.Thread(target=client, args=(m,)) for m in ("slides", "patches")]
        for thread in threads:
            thread.start()
        try:
            with Archive.open(copy) as archive:
                for _ in range(3):
                    archive.reindex()
        finally:
            done.set()
            for thread in threads:
                thread.join()
    assert set(statuses) == {200}, sorted(set(statuses))
    assert len(answers) > 6
    for mode in ("slides", "patches"):
        assert len({str(found) for m, found in answers if m == mode}) == 1  # one answer throughout
