"""`histosearch bench scale`: slide and patch search over a synthetic archive of N patches.

The archive is shaped like a real one without embedding N patches: real patches of the dev
sets (IDC patients, LC25000 source groups) are embedded once with a real encoder and
projected by PCA to the searchable dimension; each synthetic slide then mixes one to three
of these real sources (of one dataset), keeps a random part of their patches as centres, and
draws its patches around them with noise. Slides made from the same sources resemble each
other as slides of one tissue and diagnosis do, and sizes follow a log-normal law from 200 to
5,000 patches. The vectors are written straight into the float16 store (a memory map), as
the archive keeps its reduced vectors; no HDF5 files, no encoder over N patches.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path

import numpy as np

from histosearch.archive.checksums import array_checksum, write_checksummed
from histosearch.archive.reduce import PCAReducer
from histosearch.bench.common import peak_rss_gb
from histosearch.fileio import atomic_path
from histosearch.search.patch_index import PatchIndex
from histosearch.search.two_stage import DEFAULT_SHORTLIST, Shortlist, Sketches, rank_slides

MIN_SLIDE, MAX_SLIDE = 200, 5_000
# log-normal slide sizes: median 800 patches (a slide at 20x is a few hundred to thousands)
SIZE_MEDIAN, SIZE_SIGMA = 800, 0.8
QUERY_PATCHES = (200, 400)
# The blocked exact pass (`exact_rankings`): rows read per block, the first screen's width (in
# multiples of k), and the bound on a bfloat16 slide similarity's error: inputs and cosines
# rounded to 8 significant bits move a cosine of unit vectors by at most 3 * 2^-9 = 0.006.
EXACT_BLOCK_ROWS = 1 << 16
SCREEN_WIDTH = 8
BF16_ERROR = 0.01
# Queries answered per blocked pass (each pass reads the whole store once).
EXACT_GROUP = 5
# real sources embedded per dataset, and patches per source
SOURCES_PER_SET, PATCHES_PER_SOURCE = 40, 12
SCALE_KEYS = (
    "patches",
    "slides",
    "build_s",
    "add_one_s",
    "slide_query_p50_s",
    "slide_query_p95_s",
    "verified_query_p50_s",
    "exact_query_p50_s",
    "patch_query_p50_s",
    "top5_agreement",
    "top1_agreement",
    "peak_rss_gb",
)


@dataclass(frozen=True)
class ScaleResult:
    """The figures of one `bench scale` run (the `--json` keys), plus how it was run."""

    patches: int
    slides: int
    build_s: float
    add_one_s: float
    slide_query_p50_s: float
    slide_query_p95_s: float
    # the same two-stage queries with the store rows of every slide measured verified against
    # their checksums first, as a Searcher does (SearchView.verify)
    verified_query_p50_s: float
    exact_query_p50_s: float
    patch_query_p50_s: float
    top5_agreement: float
    top1_agreement: float
    peak_rss_gb: float
    index: str = ""
    queries: int = 0
    exact_queries: int = 0
    generate_s: float = 0.0
    store_gb: float = 0.0
    index_gb: float = 0.0
    # per `--filter-keep` fraction: the slides kept, the two-stage and exact p50 latency of
    # slide queries restricted to them, and the top-5 agreement of the two
    filtered: list[dict[str, float]] = field(default_factory=list)
    # what the agreement's exact answers cost: the seconds spent on all `exact_queries` (the
    # exact scans of the timed ones, the blocked passes' share for the others), and the
    # slides measured in float32 per query (all of them for a timed query; `exact_rankings`)
    exact_pass_s: float = 0.0
    exact_screened: float = 0.0
    # stage 1's knobs (`Shortlist`), and whether the store, index and exact answers were
    # those of an earlier run in the same workdir (`--reuse`)
    shortlist: dict[str, int | None] = field(default_factory=dict)
    reused: bool = False
    # stage 1's sketch rows, kept together as the archive keeps them: the seconds they took
    # to gather from the store (once per build and sketch size) and their size on disk
    sketch_s: float = 0.0
    sketch_gb: float = 0.0
    # what the add that passes UNSAVED_SHARE costs the archive's writer on top of add_one_s
    # (`upkeep.SearchFiles`): the patch index and the sketches written again and checksummed
    # (streamed to disk: peak_rss_gb includes it)
    rewrite_s: float = 0.0

    def figures(self) -> dict[str, float | int]:
        return {key: asdict(self)[key] for key in SCALE_KEYS}


def _sources(data: Path) -> list[tuple[str, list[Path]]]:
    """(dataset, patch paths) of the first SOURCES_PER_SET IDC patients and LC25000 groups."""
    sources = []
    for folder, column in (("idc-breast-dev", "patient"), ("lc25000-lung-dev", "group")):
        manifest = data / folder / "manifest.csv"
        with manifest.open(newline="") as file:
            members: dict[str, list[Path]] = defaultdict(list)
            for row in csv.DictReader(file):
                members[row[column]].append(manifest.parent / row["path"])
        chosen = [paths for paths in members.values() if len(paths) >= 8][:SOURCES_PER_SET]
        sources.extend((folder, paths[:PATCHES_PER_SOURCE]) for paths in chosen)
    return sources


def real_embeddings(
    data: Path, encoder_name: str, cache: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real patch embeddings of the dev sets' sources: (features, source of each row, dataset
    of each source), cached in `cache` (an .npz) between runs."""
    if cache.is_file():
        with np.load(cache) as stored:
            if str(stored["encoder"]) == encoder_name:
                return stored["features"], stored["source"], stored["dataset"]
    from histosearch.embed import ImageDataset, default_device, embed_dataset
    from histosearch.encoders import create_encoder

    sources = _sources(data)
    encoder = create_encoder(encoder_name).to(default_device())
    paths = [p for _, members in sources for p in members]
    features = embed_dataset(ImageDataset(paths, encoder.input_size), encoder, 32, 1)
    source = np.repeat(np.arange(len(sources)), [len(m) for _, m in sources])
    dataset = np.array([0 if name.startswith("idc") else 1 for name, _ in sources])
    with atomic_path(cache) as tmp, tmp.open("wb") as file:
        np.savez(file, encoder=encoder_name, features=features, source=source, dataset=dataset)
    return features, source, dataset


class SlideMaker:
    """Synthetic slides drawn around real embeddings (see the module docstring)."""

    def __init__(
        self, centres: np.ndarray, source: np.ndarray, dataset: np.ndarray, seed: int
    ) -> None:
        self.centres, self.rng = centres.astype(np.float32), np.random.default_rng(seed)
        self.members = [np.flatnonzero(source == s) for s in range(len(dataset))]
        self.by_dataset = [np.flatnonzero(dataset == d) for d in np.unique(dataset)]
        # noise on the scale of the distance between a real patch and its nearest neighbour
        squared = (self.centres**2).sum(axis=1)
        distances = squared[:, None] + squared[None] - 2 * self.centres @ self.centres.T
        np.fill_diagonal(distances, np.inf)
        nearest = np.sqrt(np.maximum(distances.min(axis=1), 0))
        self.noise = float(np.median(nearest)) / np.sqrt(centres.shape[1])

    def size(self) -> int:
        size = self.rng.lognormal(np.log(SIZE_MEDIAN), SIZE_SIGMA)
        return int(np.clip(size, MIN_SLIDE, MAX_SLIDE))

    def slide(self, n: int) -> np.ndarray:
        """One slide of `n` patches."""
        pool = self.by_dataset[self.rng.integers(len(self.by_dataset))]
        picked = self.rng.choice(pool, self.rng.integers(1, 4), replace=False)
        rows = np.concatenate([self.members[s] for s in picked])
        rows = self.rng.choice(rows, max(2, int(len(rows) * self.rng.uniform(0.4, 1))), False)
        scale = self.noise * self.rng.uniform(0.5, 1.5)
        noise = self.rng.standard_normal((n, self.centres.shape[1]), dtype=np.float32)
        return self.centres[self.rng.choice(rows, n)] + scale * noise


def write_store(
    path: Path, maker: SlideMaker, n_patches: int, on_progress: Callable[[int], None] | None
) -> tuple[np.ndarray, list[int]]:
    """Write slides of `maker` into a float16 store file of about `n_patches` rows (the last
    slide is cut to fit); returns the slides' row offsets and the checksum of each slide's
    rows (as the catalog records them)."""
    sizes, checksums = [], []
    with path.open("wb") as file:
        total = 0
        while total < n_patches:
            n = max(min(maker.size(), n_patches - total), 1)
            rows = maker.slide(n).astype(np.float16)
            file.write(rows.tobytes())
            checksums.append(array_checksum(rows))
            sizes.append(n)
            total += n
            if on_progress is not None:
                on_progress(n)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), checksums


def open_store(path: Path, dim: int) -> np.ndarray:
    return np.memmap(path, dtype=np.float16, mode="r").reshape(-1, dim)


@dataclass(frozen=True)
class ExactPass:
    """The exact top k of many slide queries from one blocked pass over the store."""

    rankings: np.ndarray  # (queries, k) slide indices, best first
    seconds: float
    # slides measured in float32 for each query (the screen's final width)
    widths: np.ndarray

    @property
    def screened(self) -> float:
        return float(np.mean(self.widths)) if len(self.widths) else 0.0


def exact_rankings(
    path: Path,
    dim: int,
    offsets: np.ndarray,
    queries: list[np.ndarray],
    k: int,
    on_progress: Callable[[int], None] | None = None,
) -> ExactPass:
    """The exact scan of every query at once, for stores too big to scan once per query.

    The store is read once, EXACT_BLOCK_ROWS rows (whole slides) at a time and not memory
    mapped, and the WSI measure of every query against every slide is taken in bfloat16 (about
    four times float32's speed here, its chunks padded as similarity pads them). Each query's
    best slides by that screen are then measured in float32 as the search measures them; the
    screen widens until the k-th float32 similarity clears the best left-out screen score by
    BF16_ERROR, which bounds the bfloat16 error.
    """
    import torch

    from histosearch.search.two_stage import exact_similarities

    start = time.perf_counter()
    n_slides = len(offsets) - 1
    screen = np.empty((len(queries), n_slides), np.float32)
    threads, workers = torch.get_num_threads(), os.cpu_count() or 1
    torch.set_num_threads(1)  # one torch thread in each of the pool's
    with path.open("rb") as file, ThreadPoolExecutor(workers) as pool:
        first = 0
        while first < n_slides:
            last = int(np.searchsorted(offsets, offsets[first] + EXACT_BLOCK_ROWS, "right")) - 1
            last = min(max(last, first + 1), n_slides)
            file.seek(int(offsets[first]) * dim * 2)
            count = int(offsets[last] - offsets[first]) * dim
            block = np.fromfile(file, np.float16, count).reshape(-1, dim)
            local = offsets[first : last + 1] - offsets[first]
            screen[:, first:last] = _screen(queries, block, local, pool, workers)
            if on_progress is not None:
                on_progress(int(local[-1]))
            first = last
    torch.set_num_threads(threads)
    store = open_store(path, dim)
    rankings, widths = np.empty((len(queries), k), np.int64), []
    for q, (query, scores) in enumerate(zip(queries, screen, strict=True)):
        order = np.argsort(-scores, kind="stable")
        width = min(SCREEN_WIDTH * k, n_slides)
        while True:
            kept = np.sort(order[:width])
            sims = exact_similarities(store, offsets, query, kept)
            best = np.argsort(-sims, kind="stable")[:k]
            left_out = scores[order[width]] if width < n_slides else -np.inf
            if sims[best[-1]] >= left_out + BF16_ERROR:  # always true once all are kept
                break
            width = min(width * 4, n_slides)
        rankings[q], widths = kept[best], [*widths, width]
    return ExactPass(rankings, time.perf_counter() - start, np.array(widths))


def _screen(
    queries: list[np.ndarray],
    block: np.ndarray,
    local: np.ndarray,
    pool: ThreadPoolExecutor,
    workers: int,
) -> np.ndarray:
    """The bfloat16 WSI measure of every query against every slide of a block, its slides
    split between the pool's threads (1.3x one product on two torch threads, 2 cores)."""
    import torch

    from histosearch.search.similarity import many_slide_similarities

    n_slides = len(local) - 1
    bounds = np.linspace(0, n_slides, min(workers, n_slides) + 1).astype(int)
    parts = pool.map(
        lambda a, b: many_slide_similarities(
            queries, block[local[a] : local[b]], local[a : b + 1] - local[a], torch.bfloat16
        ),
        bounds[:-1],
        bounds[1:],
    )
    return np.concatenate(list(parts), axis=1)


@dataclass(frozen=True)
class Built:
    """The synthetic archive of a run, as `build.json` in its workdir records it."""

    patches: int
    dim: int
    seed: int
    encoder: str
    kind: str
    generate_s: float
    build_s: float
    add_one_s: float

    def same_archive(self, other: Built) -> bool:
        return astuple(self)[:5] == astuple(other)[:5]  # all but the timings


def _build(
    maker: SlideMaker,
    n_patches: int,
    workdir: Path,
    wanted: Built,
    on_stage: Callable[[str], None],
    on_progress: Callable[[int], None] | None,
) -> Built:
    """Write the store, build and save its index, add one slide; records it in build.json.
    The exact answers kept from an earlier build are removed first."""
    for folder in workdir.glob("exact-k*"):
        shutil.rmtree(folder)
    for sketches in workdir.glob("sketches-*"):
        sketches.unlink()
    on_stage(f"writing {n_patches:,} patches")
    start = time.perf_counter()
    store_path = workdir / "store.f16"
    last = maker.slide(maker.size()).astype(np.float16)  # the slide added at the end
    offsets, checksums = write_store(store_path, maker, n_patches - len(last), on_progress)
    generate_s = time.perf_counter() - start

    on_stage("building the patch index")
    store = open_store(store_path, wanted.dim)
    start = time.perf_counter()
    index = PatchIndex.build(store, kind=wanted.kind)
    build_s = time.perf_counter() - start

    on_stage("adding one slide")
    start = time.perf_counter()
    with store_path.open("ab") as file:
        file.write(last.tobytes())
    store = open_store(store_path, wanted.dim)
    offsets = np.append(offsets, offsets[-1] + len(last))
    index.add(store[offsets[-2] :])
    add_one_s = time.perf_counter() - start
    checksums.append(array_checksum(last))

    index.save(workdir / "index.faiss")
    np.save(workdir / "offsets.npy", offsets)
    np.save(workdir / "checksums.npy", np.array(checksums, np.uint32))
    built = replace(wanted, generate_s=generate_s, build_s=build_s, add_one_s=add_one_s)
    with atomic_path(workdir / "build.json") as tmp:
        tmp.write_text(json.dumps(asdict(built), indent=2) + "\n")
    return built


def _earlier_build(workdir: Path, wanted: Built) -> Built | None:
    """The build recorded in `workdir` when it is the archive `wanted` describes."""
    record = workdir / "build.json"
    if not record.is_file():
        return None
    built = Built(**json.loads(record.read_text()))
    return built if built.same_archive(wanted) else None


def _sketches(
    workdir: Path, store: np.ndarray, offsets: np.ndarray, per_slide: int
) -> tuple[Sketches, float]:
    """Stage 1's sketches of the build, as the archive keeps them beside its index: gathered
    from the store and saved once per sketch size, then loaded (with the seconds the
    gathering took)."""
    path, seconds = workdir / f"sketches-{per_slide}.npz", workdir / f"sketches-{per_slide}.s"
    if path.is_file():
        return Sketches.load(path), float(seconds.read_text())
    start = time.perf_counter()
    sketches = Sketches.of(store, offsets, per_slide)
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        sketches.save(file)
    took = time.perf_counter() - start
    seconds.write_text(f"{took}\n")
    return sketches, took


def _exact_folder(workdir: Path, k: int) -> Path:
    return workdir / f"exact-k{k}"


def _keep_exact(
    workdir: Path, k: int, query: int, ranking: np.ndarray, seconds: float, width: int
) -> None:
    """Keep query `query`'s exact top k (found in `seconds`, `width` slides measured)."""
    folder = _exact_folder(workdir, k)
    folder.mkdir(exist_ok=True)
    with atomic_path(folder / f"{query}.npz") as tmp, tmp.open("wb") as file:
        np.savez(file, ranking=ranking, seconds=seconds, width=width)


def _exact_pass(
    workdir: Path,
    dim: int,
    offsets: np.ndarray,
    queries: list[np.ndarray],
    k: int,
    on_progress: Callable[[int], None] | None,
) -> ExactPass:
    """The exact answers of `queries`: those already kept in `exact-kK/Q.npz` (query Q is drawn
    from the seed in order, so Q names it; a new build clears the folder), the others from
    blocked passes of EXACT_GROUP queries, each kept once found, so that a pass at 10^8 that
    is stopped keeps what it found and `--reuse` goes on from there."""
    files = [_exact_folder(workdir, k) / f"{q}.npz" for q in range(len(queries))]
    missing = [q for q, file in enumerate(files) if not file.is_file()]
    for first in range(0, len(missing), EXACT_GROUP):
        group = missing[first : first + EXACT_GROUP]
        exact = exact_rankings(
            workdir / "store.f16", dim, offsets, [queries[q] for q in group], k, on_progress
        )
        for q, ranking, width in zip(group, exact.rankings, exact.widths, strict=True):
            _keep_exact(workdir, k, q, ranking, exact.seconds / len(group), width)
    rankings, seconds, widths = np.empty((len(queries), k), np.int64), 0.0, []
    for q, file in enumerate(files):
        with np.load(file) as stored:
            rankings[q], seconds = stored["ranking"], seconds + float(stored["seconds"])
            widths.append(int(stored["width"]))
    return ExactPass(rankings, seconds, np.array(widths))


def bench_scale(
    n_patches: int,
    dim: int,
    workdir: Path,
    data: Path,
    encoder_name: str,
    *,
    queries: int = 40,
    exact_queries: int | None = None,
    exact_timed: int = 10,
    k: int = 5,
    kind: str = "auto",
    nprobe: int | None = None,
    shortlist: Shortlist = DEFAULT_SHORTLIST,
    filter_keep: tuple[float, ...] = (),
    seed: int = 0,
    reuse: bool = False,
    on_stage: Callable[[str], None] = lambda _: None,
    on_progress: Callable[[int], None] | None = None,
) -> ScaleResult:
    """Build a synthetic archive of `n_patches` in `workdir`, index it, grow it by one slide,
    and time slide queries (two-stage and exact, and restricted to a random `filter_keep`
    fraction of the slides, as a `--where` filter restricts them) and patch queries. With
    `reuse`, the store, index and exact answers an earlier run left in `workdir` for the same
    archive (size, dimension, seed, encoder, index kind) are used again, so that stage 1's
    knobs can be compared on one large archive built once."""
    on_stage("embedding the real sources")
    features, source, dataset = real_embeddings(data, encoder_name, workdir / "sources.npz")
    centres = PCAReducer(dim).fit(features).transform(features)
    maker = SlideMaker(centres, source, dataset, seed)

    wanted = Built(n_patches, dim, seed, encoder_name, kind, 0.0, 0.0, 0.0)
    built = _earlier_build(workdir, wanted) if reuse else None
    reused = built is not None
    if built is None:
        built = _build(maker, n_patches, workdir, wanted, on_stage, on_progress)
    store_path = workdir / "store.f16"
    store = open_store(store_path, dim)
    index = PatchIndex.load(workdir / "index.faiss")
    offsets = np.load(workdir / "offsets.npy")
    checksums = np.load(workdir / "checksums.npy")
    if nprobe is not None:
        index.nprobe = nprobe
    on_stage("sketching the slides")
    sketches, sketch_s = _sketches(workdir, store, offsets, shortlist.sketch_rows)

    on_stage("slide queries")
    fresh = SlideMaker(centres, source, dataset, seed + 1)
    query_set = [
        fresh.slide(int(fresh.rng.integers(*QUERY_PATCHES))).astype(np.float16).astype(np.float32)
        for _ in range(queries)
    ]

    def verify(slides: np.ndarray) -> None:
        for slide in slides:
            if array_checksum(store[offsets[slide] : offsets[slide + 1]]) != checksums[slide]:
                raise RuntimeError(f"store rows of slide {slide} changed")

    # each query without and with verification, and (the first `exact_timed`) by the exact
    # scan as a search runs it, in turn, so that all meet the same machine
    fast_times, fast_results, verified_times, exact_times = [], [], [], []
    for i, query in enumerate(query_set):
        start = time.perf_counter()
        slides, _ = rank_slides(
            store, offsets, query, k, index=index, shortlist=shortlist, sketches=sketches
        )
        fast_times.append(time.perf_counter() - start)
        fast_results.append(slides)
        start = time.perf_counter()
        rank_slides(
            store,
            offsets,
            query,
            k,
            index=index,
            shortlist=shortlist,
            verify=verify,
            sketches=sketches,
        )
        verified_times.append(time.perf_counter() - start)
        if i < exact_timed:  # the exact scan's answer is kept as this query's exact answer
            start = time.perf_counter()
            exact_slides, _ = rank_slides(store, offsets, query, k, exact=True)
            exact_times.append(time.perf_counter() - start)
            _keep_exact(workdir, k, i, exact_slides, exact_times[-1], len(offsets) - 1)
    exact_queries = queries if exact_queries is None else min(exact_queries, queries)
    on_stage(f"exact scan of {exact_queries} queries")
    exact = _exact_pass(workdir, dim, offsets, query_set[:exact_queries], k, on_progress)
    pairs = list(zip(exact.rankings, fast_results, strict=False))
    top5 = sum(set(e.tolist()) == set(f.tolist()) for e, f in pairs)
    top1 = sum(e[0] == f[0] for e, f in pairs)

    filtered = [
        _filtered_queries(store, offsets, index, sketches, query_set, k, keep, shortlist, seed)
        for keep in filter_keep
    ]

    on_stage("patch queries")
    patches = np.concatenate(query_set)[:: max(1, sum(map(len, query_set)) // 200)]
    patch_times = []
    for patch in patches:
        start = time.perf_counter()
        index.search(patch[None], 10)
        patch_times.append(time.perf_counter() - start)

    on_stage("writing the index and the sketches again")
    rewrite_s = _rewrite_seconds(workdir, index, sketches)
    peak_rss = peak_rss_gb()
    return ScaleResult(
        patches=len(store),
        slides=len(offsets) - 1,
        build_s=built.build_s,
        add_one_s=built.add_one_s,
        slide_query_p50_s=float(np.percentile(fast_times, 50)),
        slide_query_p95_s=float(np.percentile(fast_times, 95)),
        verified_query_p50_s=float(np.percentile(verified_times, 50)),
        exact_query_p50_s=float(np.percentile(exact_times, 50)) if exact_times else math.nan,
        patch_query_p50_s=float(np.percentile(patch_times, 50)),
        top5_agreement=top5 / exact_queries,
        top1_agreement=top1 / exact_queries,
        peak_rss_gb=peak_rss,
        index=_describe(index),
        queries=queries,
        exact_queries=exact_queries,
        generate_s=built.generate_s,
        store_gb=store_path.stat().st_size / 1e9,
        index_gb=(workdir / "index.faiss").stat().st_size / 1e9,
        filtered=filtered,
        exact_pass_s=exact.seconds,
        exact_screened=exact.screened,
        shortlist=asdict(shortlist),
        reused=reused,
        sketch_s=sketch_s,
        sketch_gb=(workdir / f"sketches-{shortlist.sketch_rows}.npz").stat().st_size / 1e9,
        rewrite_s=rewrite_s,
    )


def _rewrite_seconds(workdir: Path, index: PatchIndex, sketches: Sketches) -> float:
    """The seconds the archive's writer takes to write the patch index and the sketches
    again, as `ArchiveFolder.write_derived` writes them (`write_checksummed` into a temporary
    file, renamed; here into `workdir`, removed after)."""
    start = time.perf_counter()
    for name, write in (("index", index.write), ("sketches", sketches.save)):
        with atomic_path(workdir / f"rewritten-{name}") as tmp:
            write_checksummed(tmp, write)
    seconds = time.perf_counter() - start
    for name in ("index", "sketches"):
        (workdir / f"rewritten-{name}").unlink()
    return seconds


def _filtered_queries(
    store: np.ndarray,
    offsets: np.ndarray,
    index: PatchIndex,
    sketches: Sketches,
    queries: list[np.ndarray],
    k: int,
    keep: float,
    shortlist: Shortlist,
    seed: int,
) -> dict[str, float]:
    """Slide queries restricted to a random `keep` fraction of the slides: the two-stage
    search (the others skipped inside both stages) against the exact scan of the kept ones."""
    n_slides = len(offsets) - 1
    kept = np.random.default_rng(seed).choice(n_slides, max(1, round(keep * n_slides)), False)
    skip = np.setdiff1d(np.arange(n_slides), kept).tolist()
    fast_times, exact_times, top5 = [], [], 0
    for query in queries:
        start = time.perf_counter()
        fast, _ = rank_slides(
            store, offsets, query, k, skip, index=index, shortlist=shortlist, sketches=sketches
        )
        fast_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        exact, _ = rank_slides(store, offsets, query, k, skip, exact=True)
        exact_times.append(time.perf_counter() - start)
        top5 += set(exact.tolist()) == set(fast.tolist())
    return {
        "keep": keep,
        "slides": len(kept),
        "query_p50_s": float(np.percentile(fast_times, 50)),
        "exact_p50_s": float(np.percentile(exact_times, 50)),
        "top5_agreement": top5 / len(queries),
    }


def _describe(index: PatchIndex) -> str:
    import faiss

    name = type(faiss.downcast_index(index.index)).__name__
    return (
        name
        if index.nprobe is None
        else f"{name}, nlist {index.index.nlist}, nprobe {index.nprobe}"
    )


def write_results(results: list[ScaleResult], out: Path) -> None:
    """The `--json` file: the figures of one run (a dict) or of several (a list), with
    `details` holding how each was run."""
    rows = [{**r.figures(), "details": asdict(r)} for r in results]
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n")


def plot_latency(results: list[Path], out: Path) -> None:
    """Log-log plot of slide query latency (two-stage p50 and exact p50) against patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in results:
        loaded = json.loads(path.read_text())
        rows.extend(loaded if isinstance(loaded, list) else [loaded])
    rows.sort(key=lambda r: r["patches"])
    patches = [r["patches"] for r in rows]
    figure, axes = plt.subplots(figsize=(5.5, 4.6))
    axes.loglog(patches, [r["exact_query_p50_s"] for r in rows], "o-", label="exact scan (p50)")
    axes.loglog(patches, [r["slide_query_p50_s"] for r in rows], "s-", label="two-stage (p50)")
    axes.loglog(patches, [r["slide_query_p95_s"] for r in rows], "s--", label="two-stage (p95)")
    axes.loglog(patches, [r["patch_query_p50_s"] for r in rows], "^:", label="patch query (p50)")
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel("archive size (patches, 128-d float16)")
    axes.set_ylabel("query latency (s)")
    axes.set_title("Slide query latency, 2-core CPU")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=120)
    plt.close(figure)
