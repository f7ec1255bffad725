"""Search over a sharded archive: the query fanned out to one `ShardService` per shard (in
threads here, or as Ray actors on a cluster's nodes) and the answers merged, so that the result
equals that of one archive holding the same slides.

Slide search keeps the two stages of `two_stage.rank_slides`: every shard looks up each query
(mosaic) patch's nearest patches among its own; the nearest over all shards vote as in one
archive (`slide_votes`); the slides reached are sketched by the shards that own them, the
global shortlist is measured exactly (WSI measure) by its owners, and the best k are merged by
similarity. Patch search merges each shard's best k patches.

Percentiles are read against the union of the shards' calibrations: each shard measured its
slides' and patches' nearest neighbours among its own, so in a sharded archive they read a
little lower than they would across all shards, and percentiles a little higher.

A shard that does not answer within the deadline, or answers with an error (its folder gone,
a damaged file), is named in the result's `missing_shards`, with why; its slides are not
ranked. Nothing is left out silently.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from histosearch.archive.archive import Archive
from histosearch.archive.catalog import SlideRecord
from histosearch.archive.shards import ShardedArchive
from histosearch.errors import HistosearchError
from histosearch.search.calibration import percentile
from histosearch.search.result import PatchMatch, SlideMatch
from histosearch.search.searcher import Searcher, SearchError, _QueryVectors, tile_matches
from histosearch.search.two_stage import (
    DEFAULT_SHORTLIST,
    Shortlist,
    allowed_rows,
    exact_similarities,
    query_mosaic,
    sketch_similarities,
    slide_votes,
)

if TYPE_CHECKING:
    from histosearch.archive.reduce import Reducer
    from histosearch.encoders import Encoder

# How long a search waits for the shards' answers to each of its fan-outs (a shard's first
# answer includes loading its patch index).
DEADLINE_S = 60.0


@dataclass(frozen=True)
class ShardState:
    """What a shard can search now: its state's key, its slides in store order and its
    calibration (nearest-neighbour similarities of its slides and patches)."""

    key: tuple[int, int]
    records: list[SlideRecord]
    calibration: dict[str, np.ndarray]


class ShardService(Searcher):
    """One shard's part of a sharded search, by slide id: its state, its archived query
    slides, stage 1's nearest patches, the sketch and the exact measure of given slides, and
    its best patches. Runs beside the coordinator (a thread) or as a Ray actor. A search asks
    for `state` first, which reloads what changed; its other calls read that state."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(Archive.open(root))

    def state(self, known: tuple[int, int] | None = None) -> ShardState | None:
        """The shard's state (refreshed: a search asks first), or None when its key is still
        `known`."""
        loaded = self._snapshot()
        if loaded.key == known:
            return None
        return ShardState(loaded.key, loaded.records, loaded.calibration)

    def archived(self, slide_id: int) -> tuple[SlideRecord, np.ndarray, np.ndarray]:
        """An archived slide's record, searchable vectors and coordinates."""
        return self._archived_vectors(self._loaded, self.archive.get(slide_id))

    def nearest(
        self, queries: np.ndarray, k: int, skip: Iterable[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query vector's k nearest patches of the shard outside the `skip` slides, best
        first: (similarities, the id of each hit's slide, -1 for none)."""
        loaded = self._loaded
        view = loaded.view
        skipped = [loaded.position[i] for i in skip if i in loaded.position]
        sims, rows = loaded.index.search(queries, k, allowed_rows(view.offsets, skipped))
        valid = (rows >= 0) & (rows < view.offsets[-1])
        ids = np.array([r.id for r in view.records], np.int64)
        slide_ids = np.full(rows.shape, -1, np.int64)
        slide_ids[valid] = ids[view.row_slide[rows[valid]]]
        return sims, slide_ids

    def sketch(
        self,
        query: np.ndarray,
        mosaic: tuple[np.ndarray, np.ndarray],
        slide_ids: list[int],
        sketch_rows: int,
    ) -> np.ndarray:
        """Stage 1's sketch similarity of each of the slides to the query (`mosaic`: its
        `query_mosaic`, made once for all the shards)."""
        loaded = self._loaded
        positions = np.array([loaded.position[i] for i in slide_ids], np.int64)
        view = loaded.view
        return sketch_similarities(
            view.vectors,
            view.offsets,
            query,
            positions,
            sketch_rows=sketch_rows,
            sketches=loaded.sketches,
            mosaic=mosaic,
        )

    def measure(self, vectors: np.ndarray, slide_ids: list[int]) -> np.ndarray:
        """The WSI similarity of each of the slides to the query's `vectors`, their store
        rows verified first."""
        loaded = self._loaded
        view = loaded.view
        positions = np.array([loaded.position[i] for i in slide_ids], np.int64)
        order = np.argsort(positions)  # the store read in row order
        view.verify(positions[order])
        sims = np.empty(len(positions))
        sims[order] = exact_similarities(view.vectors, view.offsets, vectors, positions[order])
        return sims

    def matches(self, vectors: np.ndarray, slide_ids: list[int]) -> list[tuple]:
        """For each of the slides, its record and the arrays of `tile_matches` (arrays, not
        objects, cross to the caller, which builds the `SlideMatch`)."""
        loaded = self._loaded
        return [
            (loaded.view.records[p], *tile_matches(loaded.view, p, vectors))
            for p in (loaded.position[i] for i in slide_ids)
        ]

    def patches(self, query: _QueryVectors, k: int, skip: Iterable[int]) -> list[PatchMatch]:
        """The shard's k patches most similar to the query, outside the `skip` slides."""
        return self._patch_hits(self._loaded, query, k, set(skip))


class Fanout(Protocol):
    """Calls one method of some shards' services at once."""

    def call(
        self, method: str, args: dict[str, tuple], missing: dict[str, str]
    ) -> dict[str, object]:
        """`method(*args[name])` on each shard `name`: the answers that came within the
        deadline; the shards that gave none are put in `missing` with why."""

    def close(self) -> None:
        """Stop the services."""


class ThreadFanout:
    """The shards' services in this process, each call in its own thread."""

    def __init__(self, roots: dict[str, Path], deadline_s: float) -> None:
        self.roots, self.deadline_s = roots, deadline_s
        self._pool = ThreadPoolExecutor(max_workers=2 * len(roots) + 2, thread_name_prefix="shard")
        self._lock = threading.Lock()
        self._opening: dict[str, Future] = {n: self._open(n) for n in roots}

    def _open(self, name: str) -> Future:
        return self._pool.submit(ShardService, self.roots[name])

    def _service(self, name: str) -> ShardService:
        """The shard's service, opened again when the last try failed."""
        with self._lock:
            opening = self._opening[name]
            if opening.done() and opening.exception() is not None:
                opening = self._opening[name] = self._open(name)
        return opening.result()

    def call(
        self, method: str, args: dict[str, tuple], missing: dict[str, str]
    ) -> dict[str, object]:
        futures = {
            name: self._pool.submit(lambda n, a: getattr(self._service(n), method)(*a), name, a)
            for name, a in args.items()
        }
        wait(futures.values(), timeout=self.deadline_s)
        answers = {}
        for name, future in futures.items():
            if not future.done():
                missing[name] = f"no answer within {self.deadline_s:g} s"
            elif isinstance(error := future.exception(), HistosearchError):
                missing[name] = str(error)
            elif error is not None:
                missing[name] = f"{type(error).__name__}: {error}"
            else:
                answers[name] = future.result()
        return answers

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for opening in self._opening.values():
            if opening.done() and opening.exception() is None:
                opening.result().archive.close()


class RayFanout:
    """One Ray actor per shard holding its service, spread over the cluster's nodes and
    restarted by Ray when its node or process dies (calls meanwhile are retried)."""

    def __init__(self, roots: dict[str, Path], deadline_s: float, address: str | None) -> None:
        from histosearch.embed.distributed import connect_ray

        self.deadline_s = deadline_s
        self._started = connect_ray(address, None)
        import ray

        actor = ray.remote(max_restarts=-1, max_task_retries=-1)(ShardService)
        self.actors = {
            name: actor.options(scheduling_strategy="SPREAD").remote(str(root))
            for name, root in roots.items()
        }

    def call(
        self, method: str, args: dict[str, tuple], missing: dict[str, str]
    ) -> dict[str, object]:
        import ray

        refs = {name: getattr(self.actors[name], method).remote(*a) for name, a in args.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.deadline_s)
        answers = {}
        for name, ref in refs.items():
            if ref not in ready:
                missing[name] = f"no answer within {self.deadline_s:g} s"
                continue
            try:
                answers[name] = ray.get(ref)
            except ray.exceptions.RayTaskError as error:  # the service raised
                cause = error.cause
                missing[name] = (
                    str(cause)
                    if isinstance(cause, HistosearchError)
                    else f"{type(cause).__name__}: {cause}"
                )
            except ray.exceptions.RayError as error:  # the actor is gone for good
                missing[name] = f"the shard's Ray actor failed ({type(error).__name__})"
        return answers

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)
        if self._started:
            ray.shutdown()


@dataclass
class _Merged:
    """The shards' states as one search reads them: every answering shard's slides, shard by
    shard (oldest first), with what each search needs to address them."""

    records: list[SlideRecord]
    shard: dict[int, str]  # slide id: its shard
    position: dict[int, int]  # slide id: its place in `records`
    calibration: dict[str, np.ndarray]
    reducer: Reducer | None
    missing: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = np.array([r.id for r in self.records], np.int64)
        self._order = np.argsort(ids)
        self._sorted_ids = ids[self._order]
        self.rows = sum(r.n_patches for r in self.records)  # stage 1's neighbours rule
        self.offsets = np.arange(len(self.records) + 1)  # one "row" per slide: _FanoutIndex

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """The places in `records` of slide ids (-1 for an id not among them)."""
        if not len(self._sorted_ids):
            return np.full(ids.shape, -1, np.int64)
        at = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        return np.where(self._sorted_ids[at] == ids, self._order[at], -1)

    def by_shard(self, ids: Iterable[int]) -> dict[str, list[int]]:
        """The slide ids grouped by the shard that holds them."""
        grouped: dict[str, list[int]] = {}
        for slide_id in ids:
            grouped.setdefault(self.shard[slide_id], []).append(slide_id)
        return grouped


class _FanoutIndex:
    """The patch index of all the shards as stage 1's `slide_votes` searches it, with one
    "row" per slide (pass offsets 0, 1, ..., n): each query patch's k nearest patches over
    the answering shards, as the slides (positions) they lie in."""

    def __init__(self, fanout: Fanout, merged: _Merged, skip: set[int]) -> None:
        self.fanout, self.merged = fanout, merged
        self.skip = {name: [] for name in set(merged.shard.values())} | merged.by_shard(skip)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        args = {name: (queries, k, skip) for name, skip in self.skip.items()}
        answers = self.fanout.call("nearest", args, self.merged.missing)
        sims, slides = [np.zeros((len(queries), 0))], [np.zeros((len(queries), 0), np.int64)]
        for sim, ids in answers.values():
            known = self.merged.positions(ids)
            sims.append(np.where(known >= 0, sim, -np.inf))
            slides.append(known)
        sims, slides = np.concatenate(sims, axis=1), np.concatenate(slides, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # ties: the older shard first
        sims, slides = np.take_along_axis(sims, order, 1), np.take_along_axis(slides, order, 1)
        return np.where(np.isfinite(sims), sims, 0), np.where(np.isfinite(sims), slides, -1)


class ShardedSearcher(Searcher):
    """`Searcher` over a sharded archive (same queries, same answers as one archive holding
    the same slides), its shards searched in threads or, with `ray_address`, by Ray actors
    ("auto", "ray://host:port"; "local" starts a local Ray instance). `shortlist` holds stage
    1's knobs, as `two_stage.rank_slides` takes them."""

    shortlist: Shortlist = DEFAULT_SHORTLIST

    def __init__(
        self,
        archive: ShardedArchive,
        *,
        encoder: Encoder | None = None,
        weights: str | Path | None = None,
        ray_address: str | None = None,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        roots = {name: archive.root / name for name in archive.names}
        if ray_address is None:
            self.fanout: Fanout = ThreadFanout(roots, deadline_s)
        else:
            self.fanout = RayFanout(
                roots, deadline_s, None if ray_address == "local" else ray_address
            )
        self._states: dict[str, ShardState] = {}
        self._merged_lock = threading.Lock()
        self._merged: tuple[tuple, _Merged] | None = None
        super().__init__(archive, encoder=encoder, weights=weights)

    def close(self) -> None:
        """Stop the shards' services (Ray actors, threads)."""
        self.fanout.close()

    def refresh(self) -> None:
        """Ask every shard for the slides it can search now."""
        self._snapshot()

    def _snapshot(self) -> _Merged:
        missing: dict[str, str] = {}
        names = self.archive.names
        known = {
            name: (self._states[name].key if name in self._states else None,) for name in names
        }
        answers = self.fanout.call("state", known, missing)
        with self._merged_lock:
            for name, state in answers.items():
                if state is not None:
                    self._states[name] = state
            live = [name for name in names if name in answers]
            states = [self._states[name] for name in live]
            signature = tuple((name, state.key) for name, state in zip(live, states, strict=True))
            if self._merged is None or self._merged[0] != signature:  # built once per change
                self._merged = (signature, self._merge(live, states))
            return replace(self._merged[1], missing=missing)

    def _merge(self, live: list[str], states: list[ShardState]) -> _Merged:
        records = [r for state in states for r in state.records]
        shard = {
            r.id: name for name, state in zip(live, states, strict=True) for r in state.records
        }
        calibration = {
            kind: np.sort(np.concatenate([s.calibration.get(kind, []) for s in states] or [[]]))
            for kind in ("slides", "patches")
        }
        position = {r.id: i for i, r in enumerate(records)}
        return _Merged(records, shard, position, calibration, self.archive.reducer())

    def _call_one(self, merged: _Merged, slide_id: int, method: str, *args: object) -> object:
        name = merged.shard.get(slide_id) or self.archive.shard_of(slide_id)
        answers = self.fanout.call(method, {name: args}, merged.missing)
        if name not in answers:
            reason = merged.missing.get(name, "it holds no such slide")
            raise SearchError(self.archive.root / name, f"the query slide's shard: {reason}")
        return answers[name]

    def _archived_vectors(
        self, loaded: _Merged, record: SlideRecord
    ) -> tuple[SlideRecord, np.ndarray, np.ndarray]:
        return self._call_one(loaded, record.id, "archived", record.id)

    def _slide_hits(
        self, loaded: _Merged, query: _QueryVectors, k: int, skip: set[int], exact: bool
    ) -> list[SlideMatch]:
        merged = loaded
        n_left = len(merged.records) - len(skip)
        chosen = None if exact else self._shortlist(merged, query, k, skip, n_left)
        if chosen is None:
            chosen = [r.id for r in merged.records if r.id not in skip]
        grouped = merged.by_shard(chosen)
        args = {name: (query.vectors, ids) for name, ids in grouped.items()}
        similarity: dict[int, float] = {}
        for name, sims in self.fanout.call("measure", args, merged.missing).items():
            similarity.update(zip(grouped[name], sims.tolist(), strict=True))
        # the best k first (ties: the first stored, as one archive orders them), then only
        # their matches, from their shards
        best = sorted(similarity, key=lambda i: (-similarity[i], merged.position[i]))[:k]
        grouped = merged.by_shard(best)
        args = {name: (query.vectors, ids) for name, ids in grouped.items()}
        found = {}
        for name, hits in self.fanout.call("matches", args, merged.missing).items():
            found.update(zip(grouped[name], hits, strict=True))
        reference = merged.calibration["slides"]
        return [
            SlideMatch.of(
                found[i][0],
                similarity[i],
                percentile(similarity[i], reference),
                query.info.tiles,
                *found[i][1:],
            )
            for i in best
            if i in found
        ]

    def _shortlist(
        self, merged: _Merged, query: _QueryVectors, k: int, skip: set[int], n_left: int
    ) -> list[int] | None:
        """Stage 1 over the shards, as `two_stage.rank_slides` takes it on one archive: the ids
        of the shortlisted slides, or None when every slide left is to be measured."""
        knobs = self.shortlist
        wanted = knobs.wanted(k, len(merged.records))
        if n_left <= wanted:
            return None
        index = _FanoutIndex(self.fanout, merged, skip)
        mosaic = query_mosaic(query.vectors)
        votes = slide_votes(
            index,
            merged.offsets,
            query.vectors,
            neighbours=knobs.neighbours_for(merged.rows),
            mosaic=mosaic,
        )
        reached = np.flatnonzero(votes > 0)
        sketched = knobs.sketched_for(len(merged.records))
        reached = reached[np.argsort(-votes[reached], kind="stable")][:sketched]
        if len(reached) > wanted:
            ids = [merged.records[p].id for p in reached]
            scores = dict.fromkeys(ids, -np.inf)
            grouped = merged.by_shard(ids)
            args = {
                name: (query.vectors, mosaic, g, knobs.sketch_rows) for name, g in grouped.items()
            }
            for name, sims in self.fanout.call("sketch", args, merged.missing).items():
                scores.update(zip(grouped[name], sims.tolist(), strict=True))
            ordered = np.array([scores[i] for i in ids])
            best = np.argsort(-ordered, kind="stable")
            reached = reached[best[np.isfinite(ordered[best])][:wanted]]  # unsketched: out
        if len(reached) < min(k, n_left):  # too short to trust: measure them all
            return None
        return [merged.records[p].id for p in np.sort(reached)]

    def _patch_hits(
        self, loaded: _Merged, query: _QueryVectors, k: int, skip: set[int]
    ) -> list[PatchMatch]:
        merged = loaded
        grouped = {name: [] for name in set(merged.shard.values())} | merged.by_shard(skip)
        args = {name: (query, k, ids) for name, ids in grouped.items()}
        answers = self.fanout.call("patches", args, merged.missing)
        hits = [hit for matches in answers.values() for hit in matches]
        hits.sort(key=lambda h: (-h.similarity, merged.position[h.record.id], h.row))
        reference = merged.calibration["patches"]
        return [replace(h, percentile=percentile(h.similarity, reference)) for h in hits[:k]]


def searcher_for(
    archive: Archive | ShardedArchive,
    *,
    encoder: Encoder | None = None,
    weights: str | Path | None = None,
    ray_address: str | None = None,
    deadline_s: float | None = None,
) -> Searcher:
    """The searcher of a plain archive or a sharded one (`ray_address` and `deadline_s`, by
    default DEADLINE_S, are for shards only)."""
    if isinstance(archive, ShardedArchive):
        return ShardedSearcher(
            archive,
            encoder=encoder,
            weights=weights,
            ray_address=ray_address,
            deadline_s=DEADLINE_S if deadline_s is None else deadline_s,
        )
    if ray_address is not None:
        raise SearchError(archive.root, "--ray-address searches the shards of a sharded archive")
    return Searcher(archive, encoder=encoder, weights=weights)
