"""The patch index and the two-stage slide search against the exact scan, on real embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_paths import LC, write_manifest
from typer.testing import CliRunner

from histosearch.archive.archive import Archive
from histosearch.cli import app
from histosearch.search.patch_index import PatchIndex, choose_factory
from histosearch.search.similarity import slide_similarities
from histosearch.search.two_stage import (
    Shortlist,
    Sketches,
    default_neighbours,
    default_sketched,
    exact_similarities,
    query_mosaic,
    rank_slides,
    shortlist_slides,
    sketch_picks,
    sketch_similarities,
)
from histosearch.search.upkeep import load_patch_index, load_sketches

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, Archive]:
    """48 LC25000 groups (8 patches each) embedded with the default encoder, reduced as the
    archive searches them, in float16 as the store holds them."""
    root = tmp_path_factory.mktemp("two-stage")
    manifest = write_manifest(root / "lc.csv", LC, "group", 16)
    result = runner.invoke(
        app, ["index", str(manifest), "--archive", str(root / "a"), "--group-by", "group"]
    )
    assert result.exit_code == 0, result.output
    archive = Archive(root / "a")
    view = archive.view()
    yield np.asarray(view.vectors), view.offsets, archive
    archive.close()


def test_flat_index_matches_the_archive_index_and_survives_save_and_load(store, tmp_path: Path):
    vectors, _, archive = store
    index = PatchIndex.build(vectors)
    assert choose_factory(len(vectors), vectors.shape[1]) == "Flat"
    assert index.ntotal == len(vectors) and index.nprobe is None
    reference = load_patch_index(archive, archive.view())  # what the archive saved while growing
    queries = vectors[::7]
    sims, rows = index.search(queries, 5)
    ref_sims, ref_rows = reference.search(queries, 5)
    assert (rows[:, 0] == ref_rows[:, 0]).mean() >= 0.95
    assert np.allclose(sims[:, 0], ref_sims[:, 0], atol=2e-3)
    assert np.all((sims >= 0) & (sims <= 1)) and np.all(np.diff(sims, axis=1) <= 1e-6)
    index.save(tmp_path / "p.faiss")
    loaded = PatchIndex.load(tmp_path / "p.faiss")
    assert loaded.metric == "cosine"
    assert np.array_equal(loaded.search(queries, 5)[1], rows)


def test_l2_similarity_is_one_over_one_plus_distance(store):
    vectors, _, _ = store
    index = PatchIndex.build(vectors, metric="l2")
    sims, rows = index.search(vectors[:10], 3)
    assert np.all(rows[:, 0] == np.arange(10)) and np.allclose(sims[:, 0], 1)
    distance = np.linalg.norm(vectors[:10].astype(np.float32) - vectors[rows[:, 1]], axis=1)
    assert np.allclose(sims[:, 1], 1 / (1 + distance), rtol=1e-4)


def test_ivf_agrees_with_flat_on_the_nearest_patch(store):
    vectors, _, _ = store
    flat = PatchIndex.build(vectors, kind="Flat")
    ivf = PatchIndex.build(vectors, kind="IVF8,Flat", nprobe=2)
    queries = vectors[1::2]
    # compared by similarity: patches whose reduced vectors tie may come back in any order
    flat_sims = flat.search(queries, 2)[0][:, 1]  # [:, 0] is the query itself
    ivf_sims = ivf.search(queries, 2)[0][:, 1]
    # measured: 185 of 192 queries find the same nearest patch probing 2 of 8 lists
    assert np.isclose(ivf_sims, flat_sims, atol=1e-6).mean() >= 0.9
    ivf.nprobe = 8  # every list: exact
    assert ivf.nprobe == 8
    assert np.allclose(ivf.search(queries, 2)[0][:, 1], flat_sims, atol=1e-6)


def test_added_rows_equal_a_build_of_everything(store):
    vectors, offsets, _ = store
    half = int(offsets[len(offsets) // 2])
    grown = PatchIndex.build(vectors[:half])
    grown.add(vectors[half:])
    whole = PatchIndex.build(vectors)
    assert grown.ntotal == whole.ntotal == len(vectors)
    assert np.array_equal(grown.search(vectors, 4)[1], whole.search(vectors, 4)[1])
    # an IVF index trained on the first half only takes the rest without retraining
    ivf = PatchIndex.build(vectors[:half], kind="IVF4,Flat", nprobe=4)
    ivf.add(vectors[half:])
    assert np.allclose(ivf.search(vectors, 4)[0], whole.search(vectors, 4)[0], atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        grown.add(vectors[:, :10])


def test_excluded_rows_never_come_back(store):
    vectors, offsets, _ = store
    index = PatchIndex.build(vectors, kind="IVF4,Flat", nprobe=4)
    allowed = np.ones(len(vectors), bool)
    allowed[offsets[0] : offsets[3]] = False
    _, rows = index.search(vectors[: offsets[3]], 10, allowed)
    assert np.all(rows >= offsets[3])


def test_rows_beyond_the_catalogued_slides_are_ignored(store):
    vectors, offsets, _ = store
    index = PatchIndex.build(vectors)  # holds every row, the catalog only the first 40 slides
    committed = np.asarray(offsets[:41])
    query = vectors[offsets[45] : offsets[46]].astype(np.float32)
    shortlist = shortlist_slides(index, vectors, committed, query, 64)
    assert len(shortlist) and shortlist.max() < 40
    slides, _ = rank_slides(vectors, committed, query, 5, index=index)
    assert np.array_equal(slides, rank_slides(vectors, committed, query, 5, exact=True)[0])


def test_mosaic_stands_for_every_patch(store):
    vectors, _, _ = store
    rows, weights = query_mosaic(vectors[:200], 16)
    assert len(rows) == len(weights) == 16 and weights.sum() == 200
    assert len(set(rows.tolist())) == 16
    assert np.array_equal(query_mosaic(vectors[:10], 16)[1], np.ones(10))


@pytest.mark.parametrize("kind", ["Flat", "IVF8,Flat"])
def test_two_stage_ranking_equals_the_exact_scan(store, kind: str):
    vectors, offsets, _ = store
    n_slides = len(offsets) - 1
    index = PatchIndex.build(vectors, kind=kind, nprobe=4)
    same_top5 = same_top1 = queries = 0
    for q in range(n_slides):
        query = vectors[offsets[q] : offsets[q + 1]].astype(np.float32)
        # skip the query's own slide; every third query also skips the exact scan's top 2
        skip = {q}
        if q % 3 == 0:
            first, _ = rank_slides(vectors, offsets, query, 2, skip, exact=True)
            skip |= set(first.tolist())
        exact, exact_sims = rank_slides(vectors, offsets, query, 5, skip, exact=True)
        fast, fast_sims = rank_slides(
            vectors, offsets, query, 5, skip, index, Shortlist(12, neighbours=16)
        )
        shortlist = shortlist_slides(
            index, vectors, offsets, query, 12, skip, Shortlist(neighbours=16)
        )
        # (a shortlist shorter than k makes rank_slides scan every slide)
        assert len(shortlist) <= 12 and not skip & set(shortlist.tolist())
        if len(shortlist) >= 5:
            assert set(fast.tolist()) <= set(shortlist.tolist())
        queries += 1
        same_top5 += set(fast.tolist()) == set(exact.tolist())
        same_top1 += fast[0] == exact[0]
        # whatever is returned carries its exact similarity
        for slide, sim in zip(fast, fast_sims, strict=True):
            reference = vectors[offsets[slide] : offsets[slide + 1]]
            single = slide_similarities(query, reference, [0, len(reference)])[0]
            assert sim == pytest.approx(single, abs=1e-6)
        assert np.all(np.diff(exact_sims) <= 0) and not skip & set(exact.tolist())
    # measured (a shortlist of 12 of 48 slides, 16 neighbours per query patch): top-1 47/48,
    # top-5 43/48 with the Flat index and 42/48 with IVF
    assert same_top1 / queries >= 0.95
    assert same_top5 / queries >= 0.85


def test_exact_scan_equals_the_full_measure_and_small_shortlists_fall_back(store):
    vectors, offsets, _ = store
    query = vectors[offsets[5] : offsets[6]].astype(np.float32)
    full = slide_similarities(query, vectors, offsets)
    slides, sims = rank_slides(vectors, offsets, query, 48, exact=True)
    assert np.array_equal(slides, np.argsort(-full, kind="stable"))
    assert np.allclose(sims, full[slides], atol=1e-6)
    # two query patches with one neighbour each reach at most two slides: too few for a top 5,
    # so every slide is scanned
    index = PatchIndex.build(vectors)
    pair = query[:2]
    assert (
        len(shortlist_slides(index, vectors, offsets, pair, 64, shortlist=Shortlist(neighbours=1)))
        <= 2
    )
    fallback = rank_slides(
        vectors, offsets, pair, 5, index=index, shortlist=Shortlist(neighbours=1)
    )[0]
    assert np.array_equal(fallback, rank_slides(vectors, offsets, pair, 5, exact=True)[0])
    assert np.array_equal(rank_slides(vectors, offsets, query, 5, index=None)[0], slides[:5])


def test_sketches_kept_together_are_the_rows_stage_1_reads_from_the_store(
    store, tmp_path: Path, monkeypatch
):
    vectors, offsets, archive = store
    sketches = Sketches.of(vectors, offsets, per_slide=3)
    slides = np.array([0, 7, 30, 47])
    picks = sketch_picks(offsets, slides, 3)
    # each slide's first and last row and one between, kept slide after slide
    assert picks[:3].tolist() == [offsets[0], offsets[0] + 3, offsets[0] + 7]
    together = [sketches.rows[sketches.starts[s] : sketches.starts[s + 1]] for s in slides]
    assert np.array_equal(np.concatenate(together), vectors[picks])
    # those of 40 slides grown by the other 8 are those of all 48; saved and loaded the same
    grown = Sketches.of(vectors, offsets[:41], 3).extended(vectors, offsets)
    assert np.array_equal(grown.rows, sketches.rows)
    assert np.array_equal(grown.starts, sketches.starts)
    with (tmp_path / "s.npz").open("wb") as file:
        grown.save(file)
    loaded = Sketches.load(tmp_path / "s.npz")
    assert loaded.per_slide == 3 and np.array_equal(loaded.rows, sketches.rows)

    # stage 1 reading them or the store: the same scores, the same answers
    query = vectors[offsets[3] : offsets[4]].astype(np.float32)
    from_store = sketch_similarities(vectors, offsets, query, slides, sketch_rows=3)
    assert np.array_equal(
        sketch_similarities(vectors, offsets, query, slides, sketch_rows=3, sketches=loaded),
        from_store,
    )
    # sketched a slide at a time (chunks of 3 rows), the same scores as all at once
    monkeypatch.setattr("histosearch.search.two_stage.SKETCH_CHUNK_ROWS", 3)
    chunked = sketch_similarities(vectors, offsets, query, slides, sketch_rows=3)
    assert np.allclose(chunked, from_store, atol=1e-6) and from_store.std() > 0.01
    monkeypatch.undo()
    index = PatchIndex.build(vectors, kind="IVF8,Flat", nprobe=4)
    for rows in (3, 4):  # sketches of another size are not used: the store is read
        knobs = Shortlist(6, neighbours=16, sketch_rows=rows)
        read = rank_slides(vectors, offsets, query, 5, {3}, index, shortlist=knobs)
        kept = rank_slides(vectors, offsets, query, 5, {3}, index, shortlist=knobs, sketches=loaded)
        assert np.array_equal(read[0], kept[0]) and np.array_equal(read[1], kept[1])

    # the archive keeps those of every stored slide, at the search's size
    view = archive.view()
    saved = load_sketches(archive, view)
    assert saved.n_slides == len(view.records) == 48
    assert np.array_equal(saved.rows, Sketches.of(view.vectors, view.offsets).rows)


def test_exact_similarities_in_runs_read_ahead_from_a_memory_map(store, tmp_path, monkeypatch):
    """Stage 2 in runs of a few slides (SCAN_ROWS), each run's store rows read ahead while the
    one before is measured: the same similarities as each slide measured alone."""
    vectors, offsets, _ = store
    vectors.astype(np.float16).tofile(tmp_path / "store.f16")
    mapped = np.memmap(tmp_path / "store.f16", np.float16, "r").reshape(vectors.shape)
    query = vectors[offsets[5] : offsets[6]].astype(np.float32)
    slides = np.array([0, 1, 2, 9, 17, 18, 30, 47])  # contiguous runs and scattered slides
    alone = [
        slide_similarities(
            query, mapped[offsets[s] : offsets[s + 1]], offsets[s : s + 2] - offsets[s]
        )
        for s in slides
    ]
    monkeypatch.setattr("histosearch.search.two_stage.SCAN_ROWS", 20)  # runs of 3 slides
    assert np.allclose(exact_similarities(mapped, offsets, query, slides), np.ravel(alone))
    assert len(exact_similarities(mapped, offsets, query, slides[:0])) == 0


def test_neighbours_grow_with_the_archive_between_the_measured_bounds():
    # 512 met the targets at 10^6 patches, 10^7 needed 2,048 (README, bench scale)
    sizes = (1_000, 100_000, 1_000_000, 4_000_000, 10_000_000, 10**9)
    assert [default_neighbours(n) for n in sizes] == [512, 512, 512, 1024, 2048, 2048]
    assert Shortlist(neighbours=16).neighbours_for(10**7) == 16


def test_sketched_slides_grow_with_the_archive_between_the_measured_bounds():
    # 1,024 met the targets at 9,179 slides, 92,194 needed 4,096 (README, bench scale)
    sizes = (10, 941, 9_179, 20_000, 92_194, 10**6)
    assert [default_sketched(n) for n in sizes] == [1024, 1024, 1024, 2048, 4096, 4096]
    assert Shortlist(max_sketched=8).sketched_for(10**6) == 8
