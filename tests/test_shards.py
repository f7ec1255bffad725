"""A sharded archive (shards.json and 4 ordinary archive folders) against one archive holding
the same slides, added the same way: the same top k and similarities in threads and through
Ray actors; a missing shard, or one that does not answer in time, named by check and search."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from data_paths import CMU, LC
from typer.testing import CliRunner

from histosearch import Archive, ArchiveSettings, Searcher
from histosearch.archive.shards import MANIFEST, ShardedArchive, check_any, open_archive
from histosearch.cli import app
from histosearch.inputs import collect_items
from histosearch.search.shards import ShardedSearcher
from histosearch.search.two_stage import default_candidates

SETTINGS = ArchiveSettings(encoder="color-histogram", n_features=32)
GROUPS_PER_CLASS, IMAGES_PER_GROUP = 12, 2
SHARD_SLIDES = 10  # 37 entries: shards of 10, 10, 10 and 7
runner = CliRunner()


def _manifest(path: Path, per_class: int = GROUPS_PER_CLASS, after: int = 0) -> Path:
    """LC25000 groups (`per_class` of each class after its first `after`, their first
    IMAGES_PER_GROUP images)."""
    with (LC / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    groups: dict[str, list[str]] = {}
    kept: dict[str, int] = {}
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            seen = groups.setdefault(row["label"], [])
            if row["group"] not in seen:
                seen.append(row["group"])
            if not after < seen.index(row["group"]) + 1 <= after + per_class:
                continue
            if kept.get(row["group"], 0) < IMAGES_PER_GROUP:
                kept[row["group"]] = kept.get(row["group"], 0) + 1
                writer.writerow({**row, "path": str((LC / row["path"]).resolve())})
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`one/`: one archive; `sharded/`: the same entries in shards of SHARD_SLIDES. The one
    archive takes the first shard's slides first, so that both fit the reduction on them."""
    root = tmp_path_factory.mktemp("shards")
    items = collect_items([_manifest(root / "lc.csv"), CMU], "group")
    assert len(items) == 3 * GROUPS_PER_CLASS + 1
    with ShardedArchive.create(root / "sharded", SETTINGS, max_slides=SHARD_SLIDES) as sharded:
        report = sharded.add(items)
        assert report.added == len(items) and not report.failures
    with Archive.create(root / "one", SETTINGS) as one:
        one.add(items[:SHARD_SLIDES])
        one.add(items[SHARD_SLIDES:])
    return root


def _ranked(result) -> list[tuple[str, float]]:
    return [(hit.record.name, hit.similarity) for hit in result.hits]


def _same(sharded, one, atol: float = 1e-6) -> None:
    """The same top k, in the same order, with the same similarities."""
    assert [n for n, _ in _ranked(sharded)] == [n for n, _ in _ranked(one)]
    assert np.allclose([s for _, s in _ranked(sharded)], [s for _, s in _ranked(one)], atol=atol)
    assert sharded.missing_shards == {}


QUERIES = [
    ({"query": 1}, "a slide of the first shard"),
    ({"query": 15}, "a slide of the second"),
    ({"query": 33, "k": 8}, "of the fourth, k 8"),
    ({"query": 25, "exact": True}, "the exact scan"),
    ({"query": 5, "mode": "patches", "k": 10}, "patches"),
    ({"query": str(CMU), "k": 3}, "a file, embedded"),
    ({"query": 12, "where": ["label != lung_n"]}, "filtered"),
]


def _compare_all(sharded_searcher: Searcher, one_searcher: Searcher) -> None:
    for options, _ in QUERIES:
        _same(sharded_searcher.search(**options), one_searcher.search(**options))


def test_the_layout_new_slides_fill_the_newest_shard_and_ids_stay_unique(built: Path):
    manifest = json.loads((built / "sharded" / MANIFEST).read_text())
    assert manifest["shards"] == ["shard-000", "shard-001", "shard-002", "shard-003"]
    assert manifest["max_slides"] == SHARD_SLIDES
    assert (built / "sharded" / "reducer.npz").is_file() and manifest["reducer_crc"]
    with open_archive(built / "sharded") as sharded, Archive.open(built / "one") as one:
        assert isinstance(sharded, ShardedArchive)
        sizes = [len(sharded.shards[name].slides()) for name in manifest["shards"]]
        assert sizes == [10, 10, 10, 7]
        # each shard holds the next slides in order, their ids starting where the last ended
        assert manifest["first_ids"] == [1, 11, 21, 31]
        records = sharded.slides()
        assert [(r.id, r.path) for r in records] == [(r.id, r.path) for r in one.slides()]
        assert sharded.shard_of(21) == "shard-002" and sharded.get(21).id == 21
        # one reduction: every shard's store holds the vectors one archive holds
        view = one.view()
        for shard in sharded.shards.values():
            mine = shard.view()
            for record in mine.records:
                theirs = next(r for r in view.records if r.path == record.path)
                assert np.array_equal(
                    mine.vectors[record.rows.start : record.rows.stop],
                    view.vectors[theirs.rows.start : theirs.rows.stop],
                )
        assert "4 shards of up to 10 slides; 37 slides" in sharded.describe()


def test_sharded_equals_one_archive_in_threads(built: Path):
    # more slides than the shortlist holds: stage 1 (and its sketch) runs over the shards
    assert default_candidates(8, 3 * GROUPS_PER_CLASS + 1) < 3 * GROUPS_PER_CLASS
    with ShardedArchive(built / "sharded") as sharded, Archive.open(built / "one") as one:
        searcher = ShardedSearcher(sharded)
        try:
            _compare_all(searcher, Searcher(one))
        finally:
            searcher.close()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()


def _actor_pid(shard: Path) -> int:
    """The process of the Ray actor that holds `shard` open (its catalog)."""
    catalog = str(shard / "catalog.sqlite")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ShardService"):
                continue
            if any(
                os.readlink(f"/proc/{pid}/fd/{fd}") == catalog
                for fd in os.listdir(f"/proc/{pid}/fd")
            ):
                return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no Ray actor holds {catalog}")


ANSWERING_S = 180


def test_sharded_equals_one_archive_on_ray_and_a_silent_actor_is_named(
    built: Path, local_ray, tmp_path: Path
):
    ray = local_ray
    with ShardedArchive(built / "sharded") as sharded, Archive.open(built / "one") as one:
        # actors import torch and open their shard on their first call: 50 s on the 2 loaded
        # cores once, so the deadline of the calls expected to answer is generous
        searcher = ShardedSearcher(sharded, ray_address="local", deadline_s=ANSWERING_S)
        try:
            _compare_all(searcher, Searcher(one))
            expected = searcher.search(15)
            # an actor that stops answering (its node hangs): named, the others' slides ranked
            pid = _actor_pid(built / "sharded" / "shard-002")
            searcher.fanout.deadline_s = 3
            os.kill(pid, signal.SIGSTOP)
            try:
                result = searcher.search(15)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert result.missing_shards == {"shard-002": "no answer within 3 s"}
            shard_002 = {r.id for r in sharded.shards["shard-002"].slides()}
            assert result.slides and not {h.record.id for h in result.slides} & shard_002
            searcher.fanout.deadline_s = ANSWERING_S
            _same(searcher.search(15), expected)  # it answers again
            # an actor whose process dies is restarted by Ray, and the search is whole
            ray.kill(searcher.fanout.actors["shard-001"], no_restart=False)
            _same(searcher.search(15), expected)
        finally:
            searcher.close()


def test_a_missing_shard_is_named_by_check_and_by_search(built: Path, tmp_path: Path):
    root = tmp_path / "sharded"
    shutil.copytree(built / "sharded", root)
    with ShardedArchive(root) as whole:
        lost = {r.id for r in whole.shards["shard-001"].slides()}
    shutil.rmtree(root / "shard-001")
    problems, description = check_any(root)
    assert [p.path for p in problems] == [str(root / "shard-001")]
    assert "is missing" in problems[0].reason and problems[0].fix is None
    assert "shard-001 missing" in description
    done = runner.invoke(app, ["check", "--archive", str(root)])
    assert done.exit_code == 1 and "shard-001" in done.output

    with ShardedArchive(root) as sharded:
        searcher = ShardedSearcher(sharded)
        result = searcher.search(1, k=40)
        searcher.close()
    assert list(result.missing_shards) == ["shard-001"]
    assert "missing" in result.missing_shards["shard-001"]
    assert len(result.slides) == 37 - 10 - 1  # every slide but shard-001's and the query
    assert not {hit.record.id for hit in result.slides} & lost
    assert result.to_dict()["missing_shards"] == result.missing_shards

    done = runner.invoke(app, ["search", "1", "--archive", str(root), "--json"])
    assert done.exit_code == 0
    assert "warning: shard shard-001 did not answer" in done.stderr
    printed = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert list(printed["missing_shards"]) == ["shard-001"]


def test_check_repair_works_per_shard_and_keeps_the_one_reduction(built: Path, tmp_path: Path):
    root = tmp_path / "sharded"
    shutil.copytree(built / "sharded", root)
    (root / "shard-002" / "reducer-0.npz").unlink()
    (root / "shard-003" / "index-0.faiss").unlink()
    problems, _ = check_any(root)
    damaged = sorted({Path(p.path).relative_to(root).parts[0] for p in problems})
    assert damaged == ["shard-002", "shard-003"]
    problems, _ = check_any(root, repair=True)
    assert problems and all(p.repaired for p in problems)
    assert check_any(root) == ([], check_any(root)[1])
    done = runner.invoke(app, ["reindex", "--archive", str(root)])  # keeps the one reduction
    assert done.exit_code == 0 and "reindexed: 4 shards" in " ".join(done.output.split())
    with ShardedArchive(root) as sharded, Archive.open(built / "one") as one:
        searcher = ShardedSearcher(sharded)
        try:
            # a rebuilt store is reduced from the feature files' float16 features, not from
            # the encoder's float32 output: the same ranking, similarities within float16's
            for query in (1, 25):
                _same(searcher.search(query), Searcher(one).search(query), atol=1e-3)
        finally:
            searcher.close()


def test_index_grows_the_newest_shard_then_a_new_one(built: Path, tmp_path: Path):
    root = tmp_path / "sharded"
    shutil.copytree(built / "sharded", root)
    more = _manifest(tmp_path / "more.csv", per_class=2, after=GROUPS_PER_CLASS)
    args = ["--archive", str(root), "--encoder", "color-histogram", "--n-features", "32"]
    done = runner.invoke(app, ["index", str(more), str(CMU), "--group-by", "group", *args])
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())
    assert "added 6 (12 patches), 1 already there" in said
    assert "5 shards of up to 10 slides; 43 slides" in said
    with ShardedArchive(root) as sharded:
        assert [len(s.slides()) for s in sharded.shards.values()] == [10, 10, 10, 10, 3]
        assert [r.id for r in sharded.shards["shard-004"].slides()] == [41, 42, 43]
    done = runner.invoke(app, ["index", str(CMU), *args[:-1], "16"])
    assert done.exit_code != 0 and "n_features 16 (archive: 32)" in str(done.exception)
    args[1] = str(tmp_path / "plain")
    shutil.copytree(built / "one", args[1])
    done = runner.invoke(app, ["index", str(CMU), *args, "--shard-slides", "5"])
    assert done.exit_code != 0 and "plain (unsharded) archive" in str(done.exception)


def test_serve_takes_a_sharded_archive_and_names_a_missing_shard(built: Path, tmp_path: Path):
    from fastapi.testclient import TestClient

    from histosearch.server.app import create_app

    root = tmp_path / "sharded"
    shutil.copytree(built / "sharded", root)
    with Archive.open(built / "one") as one:
        expected = [h.record.name for h in Searcher(one).search(15, k=5).hits]
    with TestClient(create_app(root)) as client:
        assert client.get("/api/slides").json()["total"] == 37
        body = client.post("/api/search", json={"slide": 15, "k": 5}).json()
        assert [row["slide"] for row in body["results"]] == expected
        assert body["missing_shards"] == {}
        patch = client.get("/api/slides/33/patches/1.jpeg")  # read from the fourth shard
        assert patch.status_code == 200 and patch.headers["content-type"] == "image/jpeg"
        mark = {"query_id": body["query_id"], "query_name": body["query"]["name"]}
        mark |= {"query_slide": 15, "mode": "slides", "relevant": True}
        hit = body["results"][0]["slide_id"]
        assert client.post("/api/feedback", json={**mark, "result_slide": hit}).status_code == 201
    done = runner.invoke(
        app, ["feedback", "--archive", str(root), "--csv", str(tmp_path / "m.csv")]
    )
    assert done.exit_code == 0 and "1 marks written" in done.output
    shutil.rmtree(root / "shard-003")
    with TestClient(create_app(root)) as client:
        assert client.get("/api/slides").json()["total"] == 30
        body = client.post("/api/search", json={"slide": 15, "k": 5}).json()
        assert list(body["missing_shards"]) == ["shard-003"]
        assert all(row["slide_id"] < 31 for row in body["results"])
        assert client.get("/api/slides/33/patches/1.jpeg").status_code == 404


def test_annotate_reaches_every_shard_and_filters_as_in_one_archive(built: Path, tmp_path: Path):
    for name in ("sharded", "one"):
        shutil.copytree(built / name, tmp_path / name)
    with Archive.open(tmp_path / "one") as one:
        names = [r.name for r in one.slides()]
    table = tmp_path / "site.csv"
    table.write_text(
        "slide,site\n" + "".join(f"{n},{'A' if i % 3 else 'B'}\n" for i, n in enumerate(names))
    )
    for name in ("sharded", "one"):
        done = runner.invoke(app, ["annotate", str(table), "--archive", str(tmp_path / name)])
        assert done.exit_code == 0 and "37 slides annotated, 37 changed" in done.output
    with ShardedArchive(tmp_path / "sharded") as sharded, Archive.open(tmp_path / "one") as one:
        assert sharded.metadata().of_slide(35) == {"site": "A"} == one.metadata().of_slide(35)
        searcher = ShardedSearcher(sharded)
        try:
            options = {"query": 2, "k": 6, "where": ["site = B"]}
            result = searcher.search(**options)
            assert {result.metadata[h.record.id]["site"] for h in result.hits} == {"B"}
            _same(result, Searcher(one).search(**options))
        finally:
            searcher.close()


@pytest.mark.slow  # embeds the 960 real patches the synthetic slides are drawn around
def test_bench_shards_answers_as_one_archive_and_keeps_an_earlier_run(tmp_path: Path):
    from data_paths import DATA

    from histosearch.bench.shards import bench_shards
    from histosearch.errors import HistosearchError

    result = bench_shards(tmp_path, DATA, n_patches=6000, queries=4, ray=False)
    assert result.slides >= 4 and result.shards == 4 and set(result.p50_s) == {"one", "threads"}
    assert result.same_as_one == {"one": 1.0, "threads": 1.0}
    assert result.to_dict()["added_p50_ms"]["threads"] == round(result.added_ms("threads"), 1)
    with pytest.raises(HistosearchError, match="an earlier run"):
        bench_shards(tmp_path, DATA, n_patches=6000, queries=4, ray=False)


def test_a_damaged_shard_is_named_by_search_and_check_and_repaired(built: Path, tmp_path: Path):
    root = tmp_path / "sharded"
    shutil.copytree(built / "sharded", root)
    store = root / "shard-001" / "store" / "vectors-0.f16"
    data = bytearray(store.read_bytes())
    data[100] ^= 0xFF  # a byte of the shard's first slide's rows
    store.write_bytes(bytes(data))
    with ShardedArchive(root) as sharded:
        searcher = ShardedSearcher(sharded)
        try:
            result = searcher.search(1, k=40, exact=True)  # measures every slide
        finally:
            searcher.close()
    assert list(result.missing_shards) == ["shard-001"]
    assert "differ from the checksum" in result.missing_shards["shard-001"]
    assert len(result.slides) == 37 - 10 - 1
    problems, _ = check_any(root)
    assert {Path(p.path).relative_to(root).parts[0] for p in problems} == {"shard-001"}
    assert all(p.repaired for p in check_any(root, repair=True)[0])
    with ShardedArchive(root) as sharded:
        searcher = ShardedSearcher(sharded)
        try:
            assert searcher.search(1, k=40, exact=True).missing_shards == {}
        finally:
            searcher.close()
