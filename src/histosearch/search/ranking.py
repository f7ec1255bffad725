"""Ranking over a search view: slides by the WSI measure, patches by the FAISS patch index,
and the exclusion rules that keep a query from finding itself."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histosearch.archive.catalog import SlideRecord
from histosearch.search.similarity import index_similarity, l2_normalize, slide_similarities

if TYPE_CHECKING:
    import faiss

    from histosearch.archive.archive import SearchView

EXCLUDE_CHOICES = ("slide", "patient", "group")


@dataclass(frozen=True)
class Query:
    """What is known of a query: its archive record (if it is in the archive) and metadata."""

    record: SlideRecord | None = None
    patient: str | None = None
    group: str | None = None

    @classmethod
    def of(
        cls, record: SlideRecord | None, patient: str | None = None, group: str | None = None
    ) -> Query:
        return cls(
            record,
            patient or (record.patient if record else None),
            group or (record.group if record else None),
        )


def excluded_slides(
    records: Iterable[SlideRecord], query: Query, exclude: Iterable[str]
) -> set[int]:
    """Ids of the slides a search must skip: the query's own slide, patient or group."""
    rules = set(exclude)
    unknown = rules - set(EXCLUDE_CHOICES)
    if unknown:
        raise ValueError(f"unknown exclusion {sorted(unknown)}; choose from {EXCLUDE_CHOICES}")
    skip = set()
    for record in records:
        if (
            ("slide" in rules and query.record is not None and record.id == query.record.id)
            or (
                "patient" in rules and query.patient is not None and record.patient == query.patient
            )
            or ("group" in rules and query.group is not None and record.group == query.group)
        ):
            skip.add(record.id)
    return skip


def rank_slides(
    view: SearchView, query: np.ndarray, k: int, skip: set[int]
) -> list[tuple[int, float]]:
    """The k slides (positions in `view.records`) most similar to the query's searchable
    vectors by the WSI measure over the whole store, best first, with their similarity."""
    sims = slide_similarities(query, view.vectors, view.offsets)
    ranked = []
    for position in np.argsort(-sims, kind="stable"):
        if view.records[position].id not in skip:
            ranked.append((int(position), float(sims[position])))
            if len(ranked) == k:
                break
    return ranked


def rank_patches(
    view: SearchView, index: faiss.Index, metric: str, query: np.ndarray, k: int, skip: set[int]
) -> list[tuple[int, float]]:
    """The k store rows most similar to any of the query's vectors (each row scored by its
    best query patch), best first; rows of skipped slides are left out."""
    skipped = sum(r.n_patches for r in view.records if r.id in skip)
    depth = min(index.ntotal, k + skipped)  # deep enough that k survive the exclusions
    vectors = np.asarray(query, np.float32)
    scores, rows = index.search(l2_normalize(vectors) if metric == "cosine" else vectors, depth)
    best: dict[int, float] = {}
    for sim, row in zip(index_similarity(scores, metric).ravel(), rows.ravel(), strict=True):
        if row >= 0 and view.records[view.row_slide[row]].id not in skip:
            best[int(row)] = max(best.get(int(row), 0.0), float(sim))
    return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
