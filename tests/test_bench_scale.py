"""`bench scale` end to end on a small synthetic archive (figures are for the README, not
asserted here: only what the run must produce)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from data_paths import DATA

from histosearch.archive.checksums import array_checksum
from histosearch.bench.scale import (
    EXACT_BLOCK_ROWS,
    MAX_SLIDE,
    MIN_SLIDE,
    SCALE_KEYS,
    SCREEN_WIDTH,
    SlideMaker,
    bench_scale,
    exact_rankings,
    open_store,
    plot_latency,
    write_results,
    write_store,
)
from histosearch.search.two_stage import Shortlist, rank_slides


def test_small_scale_run_writes_the_figures_and_the_plot(tmp_path: Path):
    result = bench_scale(
        30_000,
        32,
        tmp_path,
        DATA,
        "color-histogram",
        queries=4,
        exact_queries=4,
        filter_keep=(0.5, 0.05),
        seed=3,
    )
    offsets_sizes = result.patches / result.slides
    assert result.patches == len(open_store(tmp_path / "store.f16", 32))
    assert result.patches >= 30_000 and MIN_SLIDE <= offsets_sizes <= MAX_SLIDE
    assert result.index == "IndexFlatIP" and result.exact_queries == 4 and not result.reused
    # the exact index and ~30 slides: the two-stage ranking is the exact one
    assert result.top5_agreement == result.top1_agreement == 1.0
    # filtered: the kept share of the slides, and the filtered search equals the exact scan
    kept = [max(1, round(result.slides * share)) for share in (0.5, 0.05)]
    assert [row["slides"] for row in result.filtered] == kept
    assert all(row["top5_agreement"] == 1.0 for row in result.filtered)
    assert all(getattr(result, key) > 0 for key in SCALE_KEYS if key.endswith("_s"))
    assert (tmp_path / "sources.npz").is_file() and (tmp_path / "index.faiss").is_file()
    # stage 1's sketches kept together, as the archive keeps them
    assert (tmp_path / "sketches-128.npz").is_file() and result.sketch_gb > 0 < result.sketch_s
    # and what writing them again costs the archive's writer, its files gone after
    assert result.rewrite_s > 0 and not list(tmp_path.glob("rewritten-*"))
    write_results([result], tmp_path / "r.json")
    figures = json.loads((tmp_path / "r.json").read_text())
    assert set(figures) - {"details"} == set(SCALE_KEYS)
    assert figures["patches"] == result.patches and figures["details"]["queries"] == 4
    plot_latency([tmp_path / "r.json", tmp_path / "r.json"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    # --reuse: the same build and exact answers, other stage-1 knobs
    again = bench_scale(
        30_000,
        32,
        tmp_path,
        DATA,
        "color-histogram",
        queries=4,
        exact_timed=0,
        shortlist=Shortlist(candidates=3, sketch_rows=8),
        seed=3,
        reuse=True,
    )
    assert again.reused and (again.build_s, again.patches) == (result.build_s, result.patches)
    assert again.exact_pass_s == result.exact_pass_s and np.isnan(again.exact_query_p50_s)
    assert again.shortlist["candidates"] == 3 and again.shortlist["sketch_rows"] == 8
    assert (tmp_path / "sketches-8.npz").is_file()
    # another seed is another archive: built again
    assert not bench_scale(
        30_000, 32, tmp_path, DATA, "color-histogram", queries=2, seed=4, reuse=True
    ).reused
    assert not (tmp_path / "sketches-8.npz").exists()  # those of the other build are gone
    # the store holds float16 vectors around the real (PCA-projected) embeddings
    store = open_store(tmp_path / "store.f16", 32)
    assert store.dtype == np.float16 and np.isfinite(store[:1000].astype(np.float32)).all()


def test_the_blocked_exact_pass_equals_the_exact_scan_of_each_query(tmp_path: Path):
    """`exact_rankings` (one pass, a bfloat16 screen, float32 on the screened slides) gives
    every query the top k of the exact scan that a search runs, across several blocks."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 16)).astype(np.float32)
    maker = SlideMaker(centres, np.repeat(np.arange(20), 3), np.zeros(20, int), seed=1)
    offsets, checksums = write_store(tmp_path / "store.f16", maker, 150_000, None)
    store = open_store(tmp_path / "store.f16", 16)
    assert checksums[3] == array_checksum(store[offsets[3] : offsets[4]])
    queries = [maker.slide(300).astype(np.float16).astype(np.float32) for _ in range(6)]
    passed = exact_rankings(tmp_path / "store.f16", 16, offsets, queries, 5)
    assert len(offsets) - 1 > 100 and offsets[-1] > 2 * EXACT_BLOCK_ROWS
    for query, ranking in zip(queries, passed.rankings, strict=True):
        slides, _ = rank_slides(store, offsets, query, 5, exact=True)
        assert ranking.tolist() == slides.tolist()
    assert 5 * SCREEN_WIDTH <= passed.screened < len(offsets) - 1
