"""`histosearch bench shards`: what fanning a slide search out to shards and merging the
answers adds to its latency. The same synthetic slides (`bench scale`'s, drawn around real
embeddings of the dev sets) are stored once as one archive and once as a sharded archive, with
one reduction; the same archived slides are then queried through `Searcher`, through
`ShardedSearcher` in threads and through it as one Ray actor per shard on a local Ray
instance, interleaved query by query, and each sharded answer is compared with the one
archive's (same top k, same similarities).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from histosearch.archive.archive import Archive
from histosearch.archive.settings import ArchiveSettings
from histosearch.archive.shards import ShardedArchive
from histosearch.bench.scale import SlideMaker, real_embeddings
from histosearch.errors import HistosearchError
from histosearch.search.searcher import Searcher
from histosearch.search.shards import ShardedSearcher

# Rows the reduction (PCA) is fitted on, sampled from every slide.
FIT_ROWS = 20_000
TILE = 224
MODES = ("one", "threads", "ray")


@dataclass
class ShardsResult:
    """The figures of one run: per way of searching ("one" archive, shards in "threads", shards
    on "ray"), the p50 and p95 seconds of a slide query, and the share of queries whose top k
    equals the one archive's and the exact scan's (each shard's patch index is flat below
    `patch_index.FLAT_BELOW` rows, an IVF one's lookups approximate above)."""

    patches: int
    slides: int
    shards: int
    dim: int
    k: int
    queries: int
    cpus: int
    build_s: dict[str, float]
    p50_s: dict[str, float] = field(default_factory=dict)
    p95_s: dict[str, float] = field(default_factory=dict)
    same_as_one: dict[str, float] = field(default_factory=dict)
    same_as_exact: dict[str, float] = field(default_factory=dict)

    def added_ms(self, mode: str) -> float:
        """What the fan-out and merge add to the one archive's p50, in milliseconds."""
        return 1000 * (self.p50_s[mode] - self.p50_s["one"])

    def to_dict(self) -> dict[str, object]:
        added = {m: round(self.added_ms(m), 1) for m in self.p50_s if m != "one"}
        return {**asdict(self), "added_p50_ms": added}


def _slides(maker: SlideMaker, n_patches: int) -> list[np.ndarray]:
    slides, total = [], 0
    while total < n_patches:
        n = max(min(maker.size(), n_patches - total), 1)
        slides.append(maker.slide(n))
        total += n
    return slides


def _grid(n: int) -> np.ndarray:
    """Level-0 corners of `n` tiles on a grid 64 tiles wide."""
    rows = np.arange(n)
    return np.stack([rows % 64, rows // 64], axis=1).astype(np.int64) * TILE


def build(
    workdir: Path,
    n_patches: int,
    n_shards: int,
    data: Path,
    encoder_name: str,
    dim: int,
    seed: int = 0,
    on_stage: Callable[[str], None] = lambda _: None,
) -> tuple[Path, Path, dict[str, float]]:
    """`workdir/one` and `workdir/sharded` holding the same synthetic slides (the sharded one
    in `n_shards` shards of equal slide counts), with the same PCA; returns both folders and
    the seconds each took to store and index."""
    from histosearch.encoders import create_encoder

    on_stage("embedding the real patches the slides are drawn around")
    features, source, dataset = real_embeddings(data, encoder_name, workdir / "embeddings.npz")
    slides = _slides(SlideMaker(features, source, dataset, seed), n_patches)
    rng = np.random.default_rng(seed)
    stacked = np.concatenate(slides)
    sample = stacked[np.sort(rng.choice(len(stacked), min(FIT_ROWS, len(stacked)), False))]
    del stacked
    settings = ArchiveSettings(encoder=encoder_name, n_features=dim)
    encoder = create_encoder(encoder_name)
    seconds = {}

    def store_all(archive: Archive | ShardedArchive) -> None:
        for i, slide in enumerate(slides):
            archive.store_slide(
                f"synthetic://{i}", slide, _grid(len(slide)), name=f"slide-{i:05d}", tile_l0=TILE
            )

    on_stage(f"storing {len(slides)} slides ({n_patches:,} patches) as one archive")
    start = time.perf_counter()
    with Archive.create(workdir / "one", settings, encoder) as one:
        with one.writing():
            reducer = one.fit_reducer(sample, one.generation)
            store_all(one)
        one.sync()
    seconds["one"] = time.perf_counter() - start

    on_stage(f"storing them again in {n_shards} shards")
    start = time.perf_counter()
    per_shard = math.ceil(len(slides) / n_shards)
    with ShardedArchive.create(workdir / "sharded", settings, encoder, per_shard) as sharded:
        sharded.share_reducer(reducer)  # one reduction, as the shards of one archive have
        with sharded.writing():
            store_all(sharded)
        sharded.sync()
    seconds["sharded"] = time.perf_counter() - start
    return workdir / "one", workdir / "sharded", seconds


def _same(result, reference) -> bool:
    ours = [(h.record.name, h.similarity) for h in result.hits]
    theirs = [(h.record.name, h.similarity) for h in reference.hits]
    return (
        not result.missing_shards
        and [n for n, _ in ours] == [n for n, _ in theirs]
        and np.allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-6)
    )


def bench_shards(
    workdir: Path,
    data: Path,
    *,
    n_patches: int = 150_000,
    n_shards: int = 4,
    encoder_name: str = "color-histogram",
    dim: int = 128,
    queries: int = 40,
    k: int = 5,
    ray: bool = True,
    seed: int = 0,
    on_stage: Callable[[str], None] = lambda _: None,
) -> ShardsResult:
    """Build both archives in `workdir` and time `queries` archived slides through each way of
    searching (Ray left out without `ray` or when it is not installed)."""
    if (workdir / "one").exists() or (workdir / "sharded").exists():
        raise HistosearchError(
            workdir, "holds the archives of an earlier run: remove them or give another workdir"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    one_root, sharded_root, build_s = build(
        workdir, n_patches, n_shards, data, encoder_name, dim, seed, on_stage
    )
    with Archive.open(one_root) as one, ShardedArchive(sharded_root) as sharded:
        n_slides = len(one.slides())
        searchers: dict[str, Searcher] = {
            "one": Searcher(one),
            "threads": ShardedSearcher(sharded),
        }
        if ray:
            try:
                import ray as _  # noqa: F401
            except ImportError:
                ray = False
        if ray:
            on_stage(f"starting {n_shards} Ray actors")
            searchers["ray"] = ShardedSearcher(sharded, ray_address="local")
        result = ShardsResult(
            n_patches, n_slides, n_shards, dim, k, queries, os.cpu_count() or 1, build_s
        )
        try:
            ids = [r.id for r in one.slides()]
            chosen = np.random.default_rng(seed).choice(ids, queries, replace=False).tolist()
            for searcher in searchers.values():  # warm: encoder-free, but first loads
                searcher.search(chosen[0], k=k)
            on_stage(f"timing {queries} slide queries, {', '.join(searchers)} interleaved")
            times: dict[str, list[float]] = {mode: [] for mode in searchers}
            same = dict.fromkeys(searchers, 0)
            exact = dict.fromkeys(searchers, 0)
            for i, query in enumerate(chosen):
                modes = list(searchers)
                modes = modes[i % len(modes) :] + modes[: i % len(modes)]  # order rotated
                answers = {}
                for mode in modes:
                    start = time.perf_counter()
                    answers[mode] = searchers[mode].search(query, k=k)
                    times[mode].append(time.perf_counter() - start)
                scan = searchers["one"].search(query, k=k, exact=True)  # untimed
                for mode, answer in answers.items():
                    same[mode] += _same(answer, answers["one"])
                    exact[mode] += _same(answer, scan)
            for mode, seconds in times.items():
                result.p50_s[mode] = statistics.median(seconds)
                result.p95_s[mode] = float(np.percentile(seconds, 95))
                result.same_as_one[mode] = same[mode] / queries
                result.same_as_exact[mode] = exact[mode] / queries
        finally:
            for searcher in searchers.values():
                searcher.close()
    return result
