"""`Searcher`: an archive's search store, patch index and encoder loaded once, answering queries
by file, by archived slide or by a region of one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histosearch.archive.archive import Archive
from histosearch.archive.catalog import ArchiveError, SlideRecord
from histosearch.archive.folder import searchable
from histosearch.archive.view import SearchView
from histosearch.embed.options import EmbedOptions
from histosearch.errors import HistosearchError
from histosearch.search.calibration import percentile
from histosearch.search.cases import LEVELS, Cases
from histosearch.search.consensus import Consensus
from histosearch.search.filters import FilterError, SlideFilter, value_getter
from histosearch.search.ranking import (
    EXCLUDE_CHOICES,
    Query,
    excluded_slides,
    rank_patches,
    rank_slides,
)
from histosearch.search.result import (
    PatchMatch,
    QueryInfo,
    SearchResult,
    SlideMatch,
    Tile,
)
from histosearch.search.similarity import best_matches
from histosearch.search.upkeep import load_calibration, load_patch_index, load_sketches
from histosearch.slide.dicomweb import is_dicomweb

if TYPE_CHECKING:
    from histosearch.encoders import Encoder
    from histosearch.search.patch_index import PatchIndex
    from histosearch.search.two_stage import Sketches

MODES = ("auto", "slides", "patches")
Region = tuple[int, int, int, int]


class SearchError(HistosearchError):
    """A query that cannot be answered as asked."""


@dataclass(frozen=True)
class _QueryVectors:
    info: QueryInfo
    record: SlideRecord | None
    vectors: np.ndarray


class _Loaded:
    """One consistent state of the archive as searches read it: one store generation's view,
    reduction, patch index and calibration. A search uses one throughout, so a reindex that
    switches generations meanwhile never pairs one generation's rows with another's."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.view: SearchView = archive.view()
        self.key = (self.view.generation, int(self.view.offsets[-1]))
        self.position = {r.id: i for i, r in enumerate(self.view.records)}
        self.reducer = archive.reducer(self.view.generation)
        self.calibration: dict[str, np.ndarray] = {}
        self._index: PatchIndex | None = None
        self.sketches: Sketches | None = None  # stage 1's, beside the index
        self.index_error: ArchiveError | None = None  # of the index or the sketches
        self.missing: dict[str, str] = {}  # shards that did not answer: none in one archive
        if self.view.records:
            self.calibration = load_calibration(archive, self.view.generation)
            try:  # loaded now, before a reindex can retire this generation's files
                self._index = load_patch_index(archive, self.view)
                self.sketches = load_sketches(archive, self.view)
            except ArchiveError as error:  # the exact scan needs neither
                self.index_error = error

    @property
    def records(self) -> list[SlideRecord]:
        """The searchable slides, in store order."""
        return self.view.records

    @property
    def index(self) -> PatchIndex:
        """The patch index of the view's generation."""
        if self.index_error is not None:
            raise self.index_error
        if self._index is None:
            raise SearchError(None, "the archive is empty")
        return self._index

    def record(self, record: SlideRecord) -> SlideRecord:
        """The view's copy of an archived slide (its rows in this generation's store)."""
        if record.id not in self.position:
            raise SearchError(record.path, "not yet searchable; run histosearch index again")
        return self.view.records[self.position[record.id]]


class Searcher:
    """Answers similarity queries on one archive; safe to share between threads.

    The encoder is created on the first query that needs embedding (or by `load_encoder`,
    ahead of it); the store, the patch index and the calibration are loaded once and reloaded
    only when the archive changes.
    """

    def __init__(
        self, archive: Archive, *, encoder: Encoder | None = None, weights: str | Path | None = None
    ) -> None:
        self.archive = archive
        self._encoder, self._weights = encoder, weights
        if encoder is not None:
            archive.check_encoder(encoder)
        self._lock = threading.RLock()
        # Its own lock: building the encoder takes seconds, and searches of archived slides,
        # which need none, go on meanwhile.
        self._encoder_lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._paths: dict[int, list[str] | None] = {}
        self.refresh()

    def refresh(self) -> None:
        """Pick up slides committed since the last query (cheap when nothing changed)."""
        with self._lock:
            if self._loaded is None or self._loaded.key != self._key():
                self._loaded = self._load()
            if pending := self.archive.catalog.pending():
                raise SearchError(
                    self.archive.root,
                    f"{pending} slides are embedded but not searchable "
                    "(an interrupted index?): run histosearch index again, or histosearch check "
                    "--repair",
                )

    def _load(self) -> _Loaded:
        """Load the current state. A writer that moves the archive on while it is being read
        (a reindex retiring the generation's files, an add saving a longer patch index) makes
        it read again, as the new state."""
        for _ in range(3):
            key = self._key()
            try:
                loaded = _Loaded(self.archive)
            except HistosearchError:
                if self._key() == key:
                    raise
                continue
            if loaded.index_error is None or self._key() == key:
                return loaded
        return _Loaded(self.archive)

    def close(self) -> None:
        """Stop what the searcher started (nothing, for one archive: see `ShardedSearcher`)."""

    def _key(self) -> tuple[int, int]:
        """What identifies the searchable state: the store generation and its committed rows."""
        settings = self.archive.catalog.settings()
        return int(settings.get("generation", 0)), self.archive.catalog.stored_end()

    @property
    def encoder(self) -> Encoder:
        """The archive's encoder, created on first use."""
        return self.load_encoder()

    @property
    def encoder_ready(self) -> bool:
        """Whether the encoder is built (searches by file do not wait for it)."""
        return self._encoder is not None

    def load_encoder(self) -> Encoder:
        """The archive's encoder, built now if it is not yet (a server builds it at start-up,
        in the background, so that its first search by file does not wait for it)."""
        with self._encoder_lock:
            if self._encoder is None:
                from histosearch.embed.batches import default_device
                from histosearch.encoders import create_encoder

                encoder = create_encoder(self.archive.settings["encoder"], self._weights)
                self.archive.check_encoder(encoder)
                self._encoder = encoder.to(default_device())
            return self._encoder

    def paths(self, record: SlideRecord) -> list[str] | None:
        """The image files of a patch group (None for a slide), read once per slide."""
        with self._lock:
            if record.id not in self._paths:
                self._paths[record.id] = self.archive.read(record, with_features=False).paths
            return self._paths[record.id]

    def search(
        self,
        query: str | Path | int,
        k: int = 5,
        exclude: Iterable[str] | None = None,
        mode: str = "auto",
        region: Region | None = None,
        *,
        patient: str | None = None,
        group: str | None = None,
        mpp: float | None = None,
        objective_power: float | None = None,
        exact: bool = False,
        where: Iterable[str] = (),
        vote_on: str = "label",
        level: str = "auto",
        case_column: str = "patient",
    ) -> SearchResult:
        """Rank the archive's slides (WSI measure) or patches (FAISS) by similarity to
        `query`: a file, an archived slide (id or name), optionally only its tiles inside the
        level-0 `region` (x, y, w, h). Slides are ranked on a shortlist from the patch index
        (two-stage) unless `exact` asks for the full scan.

        Only slides passing every `where` clause (see `filters`) are searched, inside both
        stages and the patch index. The result carries the consensus of its top k on
        `vote_on`. At `level` "case" (the default "auto" picks it when some case has several
        slides), slides are gathered by `case_column` and cases ranked by their best slide.
        `exclude` (default: the query's own slide, and at case level its case when known)
        names what of the query's own is skipped."""
        where = list(where)
        slide_filter = SlideFilter.parse(where)  # a malformed clause fails before any work
        if level not in LEVELS:
            raise SearchError(None, f"level {level!r}: choose from {', '.join(LEVELS)}")
        default_exclusion = exclude is None
        exclude = ["slide"] if exclude is None else list(exclude)
        if mode not in MODES:
            raise SearchError(None, f"mode {mode!r}: choose from {', '.join(MODES)}")
        if unknown := sorted(set(exclude) - set(EXCLUDE_CHOICES)):
            raise SearchError(
                None, f"exclude {', '.join(unknown)}: choose from {', '.join(EXCLUDE_CHOICES)}"
            )
        if k < 1:
            raise SearchError(None, f"k must be at least 1, not {k}")
        loaded = self._snapshot()
        records = loaded.records
        if not records:
            raise SearchError(self.archive.root, "the archive is empty")
        metadata = self.archive.metadata()
        vote = value_getter(vote_on, metadata, f"--vote-on {vote_on}")
        case_of = value_getter(case_column, metadata, f"--case-column {case_column}")
        found = self._query(loaded, query, region, mpp, objective_power)
        skip = excluded_slides(records, Query.of(found.record, patient, group), exclude)
        if slide_filter:
            passed = slide_filter.allowed(records, metadata)
            if not passed:
                raise SearchError(
                    self.archive.root,
                    f"no slide of the {len(records)} passes --where {' and '.join(where)}",
                )
            skip |= {r.id for r in records if r.id not in passed}
        use_patches = mode == "patches" or (mode == "auto" and len(found.vectors) == 1)
        if level == "auto":  # cases when some case among the slides it may return has several
            returnable = Cases.of((r for r in records if r.id not in skip), case_of)
            level = "case" if not use_patches and returnable.several() else "slide"
        if level == "case":
            if use_patches:
                raise SearchError(None, "level case ranks slides; not with --mode patches")
            if not any(case_of(r) for r in records):
                raise FilterError(None, f"--level case: no slide has a {case_column}")
            own_case = case_of(found.record) if found.record is not None else None
            if case_column == "patient":
                own_case = patient or own_case
            if default_exclusion and own_case is not None:
                skip |= {r.id for r in records if case_of(r) == own_case}
        if len(records) == len(skip):
            raise SearchError(
                self.archive.root,
                "nothing left to rank after the exclusions"
                + (f" and --where {' and '.join(where)}" if where else ""),
            )
        result = SearchResult(found.info, "patches" if use_patches else "slides", level=level)
        result.where = where
        if use_patches and mode == "auto" and found.info.tiles[0].size is not None:
            # a tiled slide (or a region of it) of one tile: say so, or it looks like a bug
            what = f"the region {list(region)}" if region is not None else "the query slide"
            result.note = (
                f"{what} holds one tile, so its nearest patches were ranked, not slides "
                "(mode auto; mode slides ranks slides by that one tile)"
            )
        if use_patches:
            result.patches = self._patch_hits(loaded, found, k, skip)
        elif level == "case":
            cases = Cases.of((r for r in records if r.id not in skip), case_of)
            hits = self._slide_hits(loaded, found, cases.slides_needed(k), skip, exact)
            result.cases = cases.rank(hits, k)
            result.slides = [case.best for case in result.cases]
        else:
            result.slides = self._slide_hits(loaded, found, k, skip, exact)
        result.consensus = Consensus.of(vote_on, [vote(hit.record) for hit in result.hits])
        result.metadata = {hit.record.id: metadata.of_slide(hit.record.id) for hit in result.hits}
        result.missing_shards = dict(loaded.missing)  # after ranking: any stage may miss one
        return result

    def _snapshot(self) -> _Loaded:
        """The state one search reads throughout (refreshed first)."""
        self.refresh()
        return self._loaded

    def _archived_vectors(
        self, loaded: _Loaded, record: SlideRecord
    ) -> tuple[SlideRecord, np.ndarray, np.ndarray]:
        """An archived query slide's searchable record, vectors and coordinates, its store rows
        verified."""
        record = loaded.record(record)
        loaded.view.verify([loaded.position[record.id]])
        rows = record.rows
        vectors = np.asarray(loaded.view.vectors[rows.start : rows.stop], np.float32)
        return record, vectors, np.asarray(loaded.view.coords[rows.start : rows.stop])

    def _query(
        self,
        loaded: _Loaded,
        query: str | Path | int,
        region: Region | None,
        mpp: float | None,
        objective_power: float | None,
    ) -> _QueryVectors:
        """The query's searchable vectors and tiles: read from the store when it is archived,
        else embedded as the archive's slides were."""
        if isinstance(query, int):
            record = self.archive.get(query)
        else:  # a file or slide name first; digits that name neither are an id
            record = self.archive.find(query)
            if record is None and str(query).isdigit() and not Path(query).exists():
                record = self.archive.get(int(query))
        if record is not None:
            record, vectors, coords = self._archived_vectors(loaded, record)
            name, tile_l0, label = record.name, record.tile_l0, record.label
        elif os.path.lexists(query) or is_dicomweb(query):  # a file, a folder, a DICOMweb URL
            from histosearch.embed.items import embed_file

            options = EmbedOptions(mpp=mpp, objective_power=objective_power)
            embedded = embed_file(query, self.encoder, self.archive.tiling, options)
            vectors = searchable(embedded.features, loaded.reducer)
            coords, name, tile_l0, label = embedded.coords, Path(query).name, embedded.tile_l0, None
        else:
            raise SearchError(query, "no such file, and no archived slide of that name or id")
        tiles = [Tile(int(x), int(y), tile_l0) for x, y in coords]
        if region is not None:
            keep = _in_region(coords, tile_l0, region)
            if not keep.any():
                raise SearchError(
                    name, f"no stored tile lies in the region {list(region)} (level-0 x, y, w, h)"
                )
            vectors, tiles = vectors[keep], [t for t, k in zip(tiles, keep, strict=True) if k]
        info = QueryInfo(name, None if record is None else record.id, tiles, region, label)
        return _QueryVectors(info, record, vectors)

    def _slide_hits(
        self, loaded: _Loaded, query: _QueryVectors, k: int, skip: set[int], exact: bool
    ) -> list[SlideMatch]:
        index = None if exact else loaded.index
        ranked = rank_slides(loaded.view, index, query.vectors, k, skip, exact, loaded.sketches)
        return self._slide_matches(loaded, query, ranked)

    def _slide_matches(
        self, loaded: _Loaded, query: _QueryVectors, ranked: Iterable[tuple[int, float]]
    ) -> list[SlideMatch]:
        """The matches of slides (by view position) with their WSI similarity: every query
        tile's best tile there, and every tile's best cosine to the query."""
        view, reference = loaded.view, loaded.calibration["slides"]
        return [
            SlideMatch.of(
                view.records[position],
                similarity,
                percentile(similarity, reference),
                query.info.tiles,
                *tile_matches(view, position, query.vectors),
            )
            for position, similarity in ranked
        ]

    def _patch_hits(
        self, loaded: _Loaded, query: _QueryVectors, k: int, skip: set[int]
    ) -> list[PatchMatch]:
        view, hits = loaded.view, []
        for row, similarity in rank_patches(view, loaded.index, query.vectors, k, skip):
            position = int(view.row_slide[row])
            record = view.records[position]
            row_in_slide = row - int(view.offsets[position])
            x, y = view.coords[row]
            paths = self.paths(record)
            hits.append(
                PatchMatch(
                    record,
                    row_in_slide,
                    Tile(int(x), int(y), record.tile_l0),
                    None if paths is None else paths[row_in_slide],
                    similarity,
                    percentile(similarity, loaded.calibration["patches"]),
                )
            )
        return hits


def tile_matches(
    view: SearchView, position: int, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The slide at `position` of the view measured against a query's `vectors`: each query
    vector's best row of the slide and their cosine, each row's best cosine to the query, and
    the rows' tile corners (see `SlideMatch.of`)."""
    start, stop = view.offsets[position], view.offsets[position + 1]
    reference = np.asarray(view.vectors[start:stop], np.float32)
    rows, cosines, tile_scores = best_matches(vectors, reference)
    return rows, cosines, tile_scores, np.asarray(view.coords[start:stop])


def _in_region(coords: np.ndarray, tile_l0: float | None, region: Region) -> np.ndarray:
    """Tiles whose centre lies inside the level-0 box (x, y, w, h)."""
    x, y, w, h = region
    if w <= 0 or h <= 0:
        raise SearchError(None, f"region {list(region)}: width and height must be positive")
    half = (tile_l0 or 0) / 2
    cx, cy = coords[:, 0] + half, coords[:, 1] + half
    return (cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)
