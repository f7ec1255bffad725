"""Slide search in two stages: a shortlist from the patch index, then the exact WSI measure.

Stage 1: each query patch (or, for a large query slide, each patch of its mosaic, weighted by
the patches it stands for) looks up its nearest archive patches in the `PatchIndex`, and every
slide among them receives that patch's best similarity into it. Summed over the query, a
slide's votes approximate sum_i max_j S_ij, the query-side half of the WSI measure only, so
the slides the votes reach are then re-scored by the whole measure taken between the mosaic
and a sketch of each slide (SKETCH_ROWS evenly spaced rows): cheap, and symmetric like the
measure. Stage 2: the exact measure (`slide_similarities`) on the best-sketched slides only,
reading just their row ranges of the store. `Shortlist` holds stage 1's knobs. Slides are
indices into `offsets` (slide k owns rows offsets[k]:offsets[k+1] of the store and index).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np
import torch

from histosearch.fileio import gather_rows, prefetch_pages, release_pages
from histosearch.search.patch_index import PatchIndex, faiss_threads
from histosearch.search.similarity import l2_normalize, slide_similarities

# Query slides with more patches than this are summarised by a mosaic of this many patches.
MOSAIC_SIZE = 64
# Stage 1's defaults, tuned with `histosearch bench scale` at 10^6 and 10^7 patches (README,
# "what each knob costs"): nearest archive patches looked up per query (mosaic) patch, at
# least and at most (`default_neighbours`); rows of each reached slide that the sketch
# measure reads; how many reached slides (by votes) are sketched at most, at least and at
# most (`default_sketched`).
MIN_NEIGHBOURS, NEIGHBOURS = 512, 2048
SKETCH_ROWS = 128
MIN_SKETCHED, MAX_SKETCHED = 1024, 4096
# The exact full scan reads the store in runs of about this many rows (whole slides), so a
# float32 copy of only one run is held at a time.
SCAN_ROWS = 1 << 20
# Stage 1 sketches the reached slides in chunks of about this many rows: the chunk's float32
# rows (4 MB) and cosines stay in the cache; 4,096 sketches at once were a 270 MB copy, made
# and normalised afresh for each query (a third of a query's time at 10^8 patches).
SKETCH_CHUNK_ROWS = 1 << 13


def default_candidates(k: int, n_slides: int) -> int:
    """Slides kept by stage 1 for a top-k search of `n_slides`: more as the archive grows,
    as √slides / 4 (measured in `histosearch bench scale`: 12 met the targets at 941 slides,
    24 at 9,179; fewer lost top-5 sets, more only cost stage 2's time)."""
    return max(12, 2 * k, math.ceil(math.sqrt(n_slides) / 4))


def default_neighbours(n_rows: int) -> int:
    """Index neighbours looked up per query patch in an archive of `n_rows` patches: more as
    it grows, √rows / 2 rounded up to a power of two, from MIN_NEIGHBOURS to NEIGHBOURS
    (measured in `histosearch bench scale`: 512 met the targets at 10^6 patches, 10^7 needed
    2,048; fewer lost top-5 sets, more cost time in FAISS and in the sketch)."""
    wanted = 2 ** math.ceil(math.log2(max(math.sqrt(n_rows) / 2, 1)))
    return min(max(wanted, MIN_NEIGHBOURS), NEIGHBOURS)


def default_sketched(n_slides: int) -> int:
    """Slides reached by the votes that are sketched at most, in an archive of `n_slides`:
    more as it grows, 8√slides rounded up to a power of two, from MIN_SKETCHED to
    MAX_SKETCHED (measured in `histosearch bench scale`: 1,024 met the targets at 9,179
    slides; at 92,194 they kept 17 of 22 top-5 sets, 4,096 all 22: the missed slides ranked
    low by votes and high by the sketch)."""
    wanted = 2 ** math.ceil(math.log2(max(8 * math.sqrt(n_slides), 1)))
    return min(max(wanted, MIN_SKETCHED), MAX_SKETCHED)


@dataclass(frozen=True)
class Shortlist:
    """Stage 1's knobs: the slides kept for stage 2 (None: `default_candidates`), the
    neighbours looked up per query patch (None: `default_neighbours`), the rows per slide
    sketched, the slides sketched at most (None: `default_sketched`)."""

    candidates: int | None = None
    neighbours: int | None = None
    sketch_rows: int = SKETCH_ROWS
    max_sketched: int | None = None

    def __post_init__(self) -> None:
        for name in ("candidates", "neighbours", "sketch_rows", "max_sketched"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")

    def wanted(self, k: int, n_slides: int) -> int:
        return self.candidates or default_candidates(k, n_slides)

    def neighbours_for(self, n_rows: int) -> int:
        return self.neighbours or default_neighbours(n_rows)

    def sketched_for(self, n_slides: int) -> int:
        return self.max_sketched or default_sketched(n_slides)


DEFAULT_SHORTLIST = Shortlist()


def query_mosaic(query: np.ndarray, size: int = MOSAIC_SIZE, seed: int = 0):
    """A query slide's mosaic: k-means into `size` clusters of its normalised vectors; for each,
    the patch nearest the centre and the number of patches it stands for. Returns (rows,
    weights); a query of at most `size` patches is its own mosaic, weight 1 each."""
    n = len(query)
    if n <= size:
        return np.arange(n), np.ones(n, np.float32)
    vectors = l2_normalize(query)
    kmeans = faiss.Kmeans(
        vectors.shape[1], size, niter=20, seed=seed, spherical=True, min_points_per_centroid=1
    )
    with faiss_threads(1):  # a few hundred points: threads cost more than they save
        kmeans.train(vectors)
        _, cluster = kmeans.index.search(vectors, 1)
    cluster = cluster[:, 0]
    distance = 1 - np.einsum("ij,ij->i", vectors, kmeans.centroids[cluster])
    order = np.lexsort((distance, cluster))  # by cluster, nearest to the centre first
    _, first, counts = np.unique(cluster[order], return_index=True, return_counts=True)
    return order[first], counts.astype(np.float32)


def allowed_rows(offsets: np.ndarray, skip: Iterable[int]) -> np.ndarray | None:
    """A boolean per store row, False for the rows of the `skip` slides (None: no skip)."""
    skip = np.fromiter(skip, np.int64)
    if not len(skip):
        return None
    keep = np.ones(len(offsets) - 1, bool)
    keep[skip] = False
    return np.repeat(keep, np.diff(offsets))


def slide_votes(
    index: PatchIndex,
    offsets: np.ndarray,
    query: np.ndarray,
    skip: Iterable[int] = (),
    neighbours: int = NEIGHBOURS,
    mosaic: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Stage 1's score of every slide (0 for slides no query patch reached); `mosaic` is the
    query's `query_mosaic` when already made."""
    offsets = np.asarray(offsets)
    rows, weights = mosaic or query_mosaic(query)
    sims, hits = index.search(query[rows], neighbours, allowed_rows(offsets, skip))
    # rows past the last catalogued slide (an add not yet committed) are not searched
    valid = (hits >= 0) & (hits < offsets[-1])
    patch = np.broadcast_to(np.arange(len(rows))[:, None], hits.shape)[valid]
    slide = np.searchsorted(offsets, hits[valid], side="right") - 1
    sims = sims[valid]
    # each query patch votes once per slide, with its best similarity into that slide: FAISS
    # lists each patch's hits best first, so a stable sort by (patch, slide) puts every pair's
    # best hit first
    pair = patch.astype(np.int64) * len(offsets) + slide
    order = np.argsort(pair, kind="stable")
    pair = pair[order]
    chosen = order[np.concatenate([[True], pair[1:] != pair[:-1]])]
    return np.bincount(
        slide[chosen], weights=sims[chosen] * weights[patch[chosen]], minlength=len(offsets) - 1
    )


def sketch_picks(offsets: np.ndarray, slides: np.ndarray, per_slide: int) -> np.ndarray:
    """The store rows of `slides`' sketches, slide after slide: `per_slide` evenly spaced rows
    of each (all its rows when it has fewer)."""
    sizes = offsets[slides + 1] - offsets[slides]
    return np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            offsets[s] + np.linspace(0, n - 1, t).astype(np.int64)
            for s, n, t in zip(slides, sizes, np.minimum(sizes, per_slide), strict=True)
        ]
    )


@dataclass(frozen=True)
class Sketches:
    """The sketch rows of an archive's first slides, contiguous, as a file derived from the
    store keeps them: `rows[starts[s]:starts[s + 1]]` are slide s's (`sketch_picks`).

    Read from the store, a sketch of a thousand slides touches a thousand scattered places of
    a file larger than memory (seconds when they are not cached); kept together they are one
    small read per slide."""

    rows: np.ndarray  # (sketch rows, dim), as the store holds them
    starts: np.ndarray  # (slides + 1,)
    per_slide: int

    @classmethod
    def of(cls, store: np.ndarray, offsets: np.ndarray, per_slide: int = SKETCH_ROWS) -> Sketches:
        """The sketches of every slide of `offsets`."""
        empty = cls(np.zeros((0, store.shape[1]), store.dtype), np.zeros(1, np.int64), per_slide)
        return empty.extended(store, offsets)

    @property
    def n_slides(self) -> int:
        return len(self.starts) - 1

    def extended(self, store: np.ndarray, offsets: np.ndarray) -> Sketches:
        """These sketches and those of the slides of `offsets` past them (slides only grow at
        the end of a store)."""
        offsets = np.asarray(offsets, np.int64)
        new = np.arange(self.n_slides, len(offsets) - 1)
        if not len(new):
            return self
        rows = gather_rows(store, sketch_picks(offsets, new, self.per_slide), SCAN_ROWS)
        sizes = np.minimum(np.diff(offsets)[new], self.per_slide)
        starts = np.concatenate([self.starts, self.starts[-1] + np.cumsum(sizes)])
        if len(self.rows):
            rows = np.concatenate([self.rows, rows])
        return Sketches(rows, starts, self.per_slide)

    def save(self, file: BinaryIO) -> None:
        np.savez(file, rows=self.rows, starts=self.starts, per_slide=self.per_slide)

    @classmethod
    def load(cls, file: BinaryIO | Path) -> Sketches:
        with np.load(file) as saved:
            return cls(saved["rows"], saved["starts"], int(saved["per_slide"]))


def _sketch_rows(
    store: np.ndarray,
    offsets: np.ndarray,
    slides: np.ndarray,
    per_slide: int,
    sketches: Sketches | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The sketch rows of `slides` (as the store holds them), slide after slide, and how many
    each has: from `sketches` when they hold these slides' sketches of this size, else from
    the store."""
    held = sketches is not None and sketches.per_slide == per_slide
    if held and len(slides) and slides.max() < sketches.n_slides:
        first, last = sketches.starts[slides], sketches.starts[slides + 1]
        rows = [sketches.rows[a:b] for a, b in zip(first.tolist(), last.tolist(), strict=True)]
        return np.concatenate(rows), last - first
    picks = sketch_picks(offsets, slides, per_slide)
    order = np.argsort(picks)  # read the store in row order
    rows = np.empty((len(picks), store.shape[1]), store.dtype)
    rows[order] = store[picks[order]]
    return rows, np.minimum(offsets[slides + 1] - offsets[slides], per_slide)


def sketch_similarities(
    store: np.ndarray,
    offsets: np.ndarray,
    query: np.ndarray,
    slides: np.ndarray,
    sketch_rows: int = SKETCH_ROWS,
    sketches: Sketches | None = None,
    mosaic: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The WSI measure between the query's mosaic (weighted; `mosaic` when already made) and
    `sketch_rows` evenly spaced rows of each of `slides` (read from `sketches` when given),
    SKETCH_CHUNK_ROWS rows at a time."""
    rows, weights = mosaic or query_mosaic(query)
    tiles = torch.from_numpy(l2_normalize(query[rows]))
    best_for_query = np.empty((len(rows), len(slides)), np.float32)  # (mosaic, slides)
    sketch_side = np.empty(len(slides))
    per_chunk = max(SKETCH_CHUNK_ROWS // sketch_rows, 1)
    for first in range(0, len(slides), per_chunk):
        chunk = slice(first, first + per_chunk)
        sketch, taken = _sketch_rows(store, offsets, slides[chunk], sketch_rows, sketches)
        # (mosaic, chunk's sketch rows), by torch as stage 2 is (two thread pools would
        # spin-wait for each other on few cores); the cosines divided by the rows' norms
        # rather than the rows normalised: half the divisions
        sketch = torch.from_numpy(sketch).float()
        norms = torch.linalg.vector_norm(sketch, dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        cosines = ((tiles @ sketch.T) / norms).numpy()
        starts = np.concatenate([[0], np.cumsum(taken)[:-1]])
        best_for_query[:, chunk] = np.maximum.reduceat(cosines, starts, axis=1)
        sketch_side[chunk] = np.add.reduceat(cosines.max(axis=0), starts) / taken
    return 0.5 * (weights / weights.sum() @ best_for_query + sketch_side)


def shortlist_slides(
    index: PatchIndex,
    store: np.ndarray,
    offsets: np.ndarray,
    query: np.ndarray,
    n_candidates: int,
    skip: Iterable[int] = (),
    shortlist: Shortlist = DEFAULT_SHORTLIST,
    sketches: Sketches | None = None,
) -> np.ndarray:
    """Stage 1: up to `n_candidates` slides (indices), best first: the slides the votes reach
    (at most `shortlist.sketched_for`, most votes first), ranked by their sketch similarity
    when there are more than `n_candidates`; slides in `skip` and slides without votes are
    never listed."""
    offsets = np.asarray(offsets)
    neighbours = shortlist.neighbours_for(int(offsets[-1]))
    mosaic = query_mosaic(query)
    votes = slide_votes(index, offsets, query, skip, neighbours, mosaic=mosaic)
    reached = np.flatnonzero(votes > 0)
    sketched = shortlist.sketched_for(len(offsets) - 1)
    reached = reached[np.argsort(-votes[reached], kind="stable")][:sketched]
    if len(reached) <= n_candidates:
        return reached
    scores = sketch_similarities(
        store,
        offsets,
        query,
        reached,
        sketch_rows=shortlist.sketch_rows,
        sketches=sketches,
        mosaic=mosaic,
    )
    return reached[np.argsort(-scores, kind="stable")][:n_candidates]


def exact_similarities(
    store: np.ndarray, offsets: np.ndarray, query: np.ndarray, slides: np.ndarray
) -> np.ndarray:
    """The WSI measure of the query against `slides` (ascending indices), reading only their
    rows, a run of about SCAN_ROWS rows at a time; a memory-mapped store's rows of the next
    run are read ahead meanwhile (`prefetch_pages`)."""
    sims = np.empty(len(slides))
    sizes = offsets[slides + 1] - offsets[slides]
    bounds = [0]
    while bounds[-1] < len(slides):
        rows = np.cumsum(sizes[bounds[-1] :])
        bounds.append(bounds[-1] + int(np.searchsorted(rows, SCAN_ROWS)) + 1)
    bounds[-1] = min(bounds[-1], len(slides))
    runs = [slides[a:b] for a, b in itertools.pairwise(bounds)]
    for i, run in enumerate(runs):
        if i == 0:
            _prefetch(store, offsets, run)
        if i + 1 < len(runs):
            _prefetch(store, offsets, runs[i + 1])
        if np.all(np.diff(run) == 1):  # contiguous slides: one slice of the store
            block = store[offsets[run[0]] : offsets[run[-1] + 1]]
        else:
            block = np.concatenate([store[offsets[s] : offsets[s + 1]] for s in run])
        local = np.concatenate([[0], np.cumsum(offsets[run + 1] - offsets[run])])
        sims[bounds[i] : bounds[i + 1]] = slide_similarities(query, block, local)
        release_pages(block)  # a scan of a store larger than memory does not hold it
    return sims


def _prefetch(store: np.ndarray, offsets: np.ndarray, run: np.ndarray) -> None:
    """Start reading the store rows of the slides of `run` (one range when contiguous)."""
    if np.all(np.diff(run) == 1):
        prefetch_pages(store[offsets[run[0]] : offsets[run[-1] + 1]])
    else:
        for s in run.tolist():
            prefetch_pages(store[offsets[s] : offsets[s + 1]])


def rank_slides(
    store: np.ndarray,
    offsets: np.ndarray,
    query: np.ndarray,
    k: int,
    skip: Iterable[int] = (),
    index: PatchIndex | None = None,
    exact: bool = False,
    shortlist: Shortlist = DEFAULT_SHORTLIST,
    verify: Callable[[np.ndarray], None] | None = None,
    sketches: Sketches | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k slides most similar to the query by the WSI measure, best first, as (slide
    indices, similarities). `exact` (or no index) scans every slide; otherwise the measure is
    computed on stage 1's shortlist only, or on every slide not skipped when they are no more
    than the shortlist would hold. `store` may be a float16 memory map: only the rows
    of the slides compared are read, and `verify` (if given) is called on those slides first
    (to refuse rows whose bytes changed). Stage 1 reads its sketches from `sketches` when
    given (`Sketches`: the same rows, kept together)."""
    offsets = np.asarray(offsets, np.int64)
    skip = set(skip)
    n_slides = len(offsets) - 1
    slides = None
    wanted = shortlist.wanted(k, n_slides)
    # when the skips (exclusions, a filter) leave no more slides than a shortlist holds,
    # scanning them all is exact and costs no more than stage 2 alone
    if not exact and index is not None and n_slides - len(skip) > wanted:
        chosen = shortlist_slides(index, store, offsets, query, wanted, skip, shortlist, sketches)
        # a shortlist shorter than k while more slides exist cannot be trusted: scan them all
        if len(chosen) >= min(k, n_slides - len(skip)):
            slides = np.sort(chosen)
    if slides is None:
        slides = np.setdiff1d(np.arange(n_slides), np.fromiter(skip, np.int64, len(skip)))
    if verify is not None:
        verify(slides)
    sims = exact_similarities(store, offsets, query, slides)
    order = np.argsort(-sims, kind="stable")[:k]  # ties: the lower slide index first
    return slides[order], sims[order]
