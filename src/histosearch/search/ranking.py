"""Ranking over a search view: slides by the WSI measure, patches by the FAISS patch index,
and the exclusion rules that keep a query from finding itself."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from histosearch.archive.catalog import SlideRecord
from histosearch.search import two_stage

if TYPE_CHECKING:
    from histosearch.archive.view import SearchView
    from histosearch.search.patch_index import PatchIndex

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
    view: SearchView,
    index: PatchIndex | None,
    query: np.ndarray,
    k: int,
    skip: set[int],
    exact: bool = False,
    sketches: two_stage.Sketches | None = None,
) -> list[tuple[int, float]]:
    """The k slides (positions in `view.records`) most similar to the query's searchable
    vectors by the WSI measure, best first, with their similarity: on the patch index's
    shortlist (two-stage), or over the whole store when `exact` (or without an index). The
    store rows of every slide measured are verified against their checksums first. Stage 1
    reads its sketch rows from `sketches` when given."""
    skipped = [i for i, record in enumerate(view.records) if record.id in skip]
    slides, sims = two_stage.rank_slides(
        view.vectors,
        view.offsets,
        query,
        k,
        skipped,
        None if exact else index,
        exact,
        verify=view.verify,
        sketches=sketches,
    )
    return list(zip(slides.tolist(), sims.tolist(), strict=True))


def rank_patches(
    view: SearchView, index: PatchIndex, query: np.ndarray, k: int, skip: set[int]
) -> list[tuple[int, float]]:
    """The k store rows most similar to any of the query's vectors (each row scored by its
    best query patch), best first; rows of skipped slides are excluded inside FAISS. The
    store rows of the slides found are verified against their checksums."""
    skipped = [i for i, record in enumerate(view.records) if record.id in skip]
    sims, rows = index.search(query, k, two_stage.allowed_rows(view.offsets, skipped))
    best: dict[int, float] = {}
    for sim, row in zip(sims.ravel().tolist(), rows.ravel().tolist(), strict=True):
        if row >= 0:
            best[row] = max(best.get(row, 0.0), sim)
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
    view.verify(sorted({int(view.row_slide[row]) for row, _ in ranked}))
    return ranked
