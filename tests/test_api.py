"""The public Python API itself: Archive.create/open/add, Searcher.search by file, by archived
slide and by region, exclusions, matched tile coordinates, percentiles, loading once."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from data_paths import CMU, LC, TCGA, write_manifest

import histosearch
from histosearch import Archive, ArchiveSettings, EmbedOptions, Searcher, SearchError


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    manifest = write_manifest(root / "lc.csv", LC, "group", 3)
    with Archive.create(root / "archive", ArchiveSettings(magnification=5.0)) as archive:
        stages = set()
        report = archive.add(
            [manifest, CMU, TCGA],
            group_by="group",
            options=EmbedOptions(objective_power=20.0),
            on_progress=lambda stage, done, total: stages.add(stage),
        )
        assert report.added == 11 and not report.failures and stages == {"slides", "patches"}
    return root / "archive"


@pytest.fixture(scope="module")
def searcher(archive_dir: Path) -> Searcher:
    return Searcher(Archive.open(archive_dir))


def test_public_names_load_lazily():
    assert histosearch.Searcher is Searcher and "Archive" in dir(histosearch)
    with pytest.raises(AttributeError):
        histosearch.NoSuchThing  # noqa: B018


def test_search_by_archived_slide_id_and_name_agree(searcher: Searcher):
    record = next(r for r in searcher.archive.slides() if r.label == "lung_scc")
    by_id = searcher.search(record.id, k=4)
    by_name = searcher.search(record.name, k=4)
    assert by_id.mode == "slides" and by_id.to_dict()["results"] == by_name.to_dict()["results"]
    assert record.id not in [hit.record.id for hit in by_id.slides]  # excludes itself
    sims = [hit.similarity for hit in by_id.slides]
    assert sims == sorted(sims, reverse=True) and all(0 <= s <= 1 for s in sims)
    # without exclusions the slide finds itself first, at similarity 1
    itself = searcher.search(record.id, k=1, exclude=())
    assert itself.slides[0].record.id == record.id
    assert itself.slides[0].similarity == pytest.approx(1, abs=1e-3)


def test_exclusions(searcher: Searcher):
    record = next(r for r in searcher.archive.slides() if r.group)
    hits = searcher.search(record.id, k=20, exclude=["group"], mode="slides").slides
    assert hits and all(hit.record.group != record.group for hit in hits)
    with pytest.raises(SearchError, match="exclude patients: choose from slide, patient, group"):
        searcher.search(record.id, exclude=["patients"])
    with pytest.raises(SearchError, match="mode 'both'"):
        searcher.search(record.id, mode="both")


def test_matched_tiles_carry_the_stored_coordinates(searcher: Searcher):
    archive = searcher.archive
    cmu = archive.find(CMU)
    result = searcher.search(cmu.id, k=3, mode="slides")
    stored_query = archive.read(cmu, with_features=False).coords
    assert [(t.x, t.y) for t in result.query.tiles] == [tuple(c) for c in stored_query]
    assert all(t.size == cmu.tile_l0 for t in result.query.tiles)
    assert cmu.tile_l0 == pytest.approx(224 * 4, rel=0.01)  # 5x tiles of a 20x scan
    for hit in result.slides:
        stored = {tuple(c) for c in archive.read(hit.record, with_features=False).coords}
        assert len(hit.matches) == len(result.query.tiles)
        for match in hit.matches:
            assert (match.reference.x, match.reference.y) in stored
            assert match.reference.size == hit.record.tile_l0
            assert 0 <= match.cosine <= 1
        assert len(hit.heatmap()) == hit.record.n_patches
        # the heat map's best tile is the best-matched tile
        _, best_score = max(hit.heatmap(), key=lambda pair: pair[1])
        assert best_score == pytest.approx(hit.best_match().cosine, abs=1e-5)
    payload = result.to_dict(heatmaps=True)["results"][0]
    assert payload["matches"][0]["query"] == result.query.tiles[0].to_dict()
    assert len(payload["heatmap"]) == result.slides[0].record.n_patches


def test_search_by_region(searcher: Searcher):
    archive = searcher.archive
    tcga = archive.find(TCGA)
    coords = archive.read(tcga, with_features=False).coords
    size = tcga.tile_l0
    x0, y0 = coords.min(axis=0)
    region = (int(x0), int(y0), int(2 * size), int(2 * size))  # the first 2 x 2 tiles' area
    result = searcher.search(tcga.id, k=3, region=region, mode="slides")
    inside = [
        (int(x), int(y))
        for x, y in coords
        if x0 <= x + size / 2 < x0 + 2 * size and y0 <= y + size / 2 < y0 + 2 * size
    ]
    assert 1 <= len(result.query.tiles) == len(inside) < tcga.n_patches
    assert [(t.x, t.y) for t in result.query.tiles] == inside
    assert result.to_dict()["query"]["region"] == list(region)
    with pytest.raises(SearchError, match="no stored tile lies in the region"):
        searcher.search(tcga.id, region=(0, 0, 10, 10))
    assert result.note is None  # mode slides, as asked
    x, y = coords[0]
    one = (int(x), int(y), int(size), int(size))  # one tile: mode auto ranks patches, saying so
    patches = searcher.search(tcga.id, k=3, region=one)
    assert patches.mode == "patches" and len(patches.query.tiles) == 1
    assert patches.note.startswith(f"the region {list(one)} holds one tile")
    assert patches.to_dict()["note"] == patches.note
    assert searcher.search(tcga.id, k=3).note is None  # many tiles: slides ranked


def test_search_by_file_patch_and_slide(searcher: Searcher):
    archive = searcher.archive
    group = next(r for r in archive.slides() if r.group)
    patch = archive.read(group, with_features=False).paths[0]
    result = searcher.search(patch, k=3, exclude=())
    # a member of a patch group is not an archived slide of its own: it is embedded, and
    # finds itself (its own stored row) first
    assert result.mode == "patches" and result.query.slide_id is None
    top = result.patches[0]
    assert top.path == patch and top.similarity == pytest.approx(1, abs=1e-3)
    # a file the archive does not hold is embedded: the CMU slide re-read from another path
    copy = Path(archive.root).parent / "copy-of-cmu.svs"
    copy.write_bytes(CMU.read_bytes())
    found = searcher.search(copy, k=2, exclude=(), mode="slides")
    assert found.query.slide_id is None and found.slides[0].record.name == CMU.name
    assert found.slides[0].similarity > 0.99
    with pytest.raises(SearchError, match="no such file"):
        searcher.search("no-such-slide.svs")


def test_percentiles_rank_as_the_similarities_do(searcher: Searcher):
    record = next(r for r in searcher.archive.slides() if r.label == "lung_n")
    for mode in ("slides", "patches"):
        hits = getattr(searcher.search(record.id, k=8, mode=mode), mode)
        assert len(hits) >= 5
        pairs = [(h.similarity, h.percentile) for h in hits]
        assert all(p is not None and 0 <= p <= 100 for _, p in pairs)
        assert [p for _, p in pairs] == sorted((p for _, p in pairs), reverse=True)
        assert pairs[0][1] > pairs[-1][1] or pairs[0][0] == pairs[-1][0]


def test_a_searcher_reads_each_feature_file_at_most_once(archive_dir: Path, monkeypatch):
    opened: list[str] = []
    real = h5py.File

    def counting(name, *args, **kwargs):
        opened.append(str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", counting)
    searcher = Searcher(Archive.open(archive_dir))
    assert opened == []  # loading reads the store, not the feature files
    records = searcher.archive.slides()
    returned = set()
    for i in range(20):
        record = records[i % len(records)]
        result = searcher.search(record.id, k=3, mode="patches" if i % 2 else "slides")
        returned |= {hit.record.feature_file for hit in result.patches}
    assert len(opened) == len(set(opened))  # never the same file twice
    assert {Path(p).relative_to(archive_dir).as_posix() for p in opened} <= returned


def test_incremental_adds_equal_a_fresh_build(tmp_path: Path):
    manifest = write_manifest(tmp_path / "lc.csv", LC, "group", 2)
    rows = manifest.read_text().splitlines()
    half = len(rows) // 2
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("\n".join(rows[:half]) + "\n")
    second.write_text("\n".join([rows[0], *rows[half:]]) + "\n")

    def build(root: Path, batches: list[list[Path]], reduction: str) -> dict:
        settings = ArchiveSettings(encoder="color-histogram", reduction=reduction, n_features=32)
        with Archive.create(root, settings) as archive:
            for batch in batches:
                archive.add(batch, group_by="group")
            if reduction != "none":
                archive.reindex()
            searcher = Searcher(archive)
            return {
                r.name: searcher.search(r.id, k=3).to_dict()["results"] for r in archive.slides()
            }

    for reduction in ("none", "pca"):
        grown = build(tmp_path / f"grown-{reduction}", [[first], [second]], reduction)
        fresh = build(tmp_path / f"fresh-{reduction}", [[first, second]], reduction)
        assert grown.keys() == fresh.keys() and len(grown) == 6

        def ranking(results: dict) -> dict:
            return {
                k: [(h["slide"], round(h["similarity"], 3)) for h in v] for k, v in results.items()
            }

        assert ranking(grown) == ranking(fresh)


def test_edges_keep_tiles_the_partial_last_row_and_column(tmp_path: Path):
    patches = {}
    for edges in ("drop", "keep"):
        settings = ArchiveSettings(encoder="color-histogram", reduction="none", edges=edges)
        with Archive.create(tmp_path / edges, settings) as archive:
            archive.add([CMU])
            assert archive.settings["edges"] == edges
            patches[edges] = archive.slides()[0].n_patches
    assert patches["keep"] > patches["drop"] > 0
    with pytest.raises(ValueError, match="edges 'all': choose from drop, keep"):
        ArchiveSettings(edges="all")
