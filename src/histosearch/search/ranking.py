"""Slide search (the WSI measure over the archive) and patch search (FAISS kNN)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosearch.archive.archive import Archive, SlideRecord
from histosearch.search.similarity import match_patches, slide_similarities

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


@dataclass(frozen=True)
class SlideHit:
    """A retrieved slide, its similarity in [0, 1] and, for every query patch, its best match
    in that slide (row in the slide and cosine)."""

    record: SlideRecord
    similarity: float
    best_rows: np.ndarray
    best_cosines: np.ndarray


@dataclass(frozen=True)
class PatchHit:
    """A retrieved patch: its slide, its row there, and its cosine similarity to the query."""

    record: SlideRecord
    row: int
    similarity: float


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


def search_slides(
    archive: Archive, query_features: np.ndarray, k: int, skip: set[int]
) -> list[SlideHit]:
    """The k archive slides most similar to the query by the WSI measure, best first."""
    features, offsets, records = archive.all_features()
    # both the measure and the matches L2-normalise their inputs themselves
    reduced = archive.reduce(features, normalise=False)
    query = archive.reduce(query_features, normalise=False)
    sims = slide_similarities(query, reduced, offsets)
    hits = []
    for index in np.argsort(-sims, kind="stable"):
        if records[index].id in skip:
            continue
        rows, cosines = match_patches(query, reduced[offsets[index] : offsets[index + 1]])
        hits.append(SlideHit(records[index], float(sims[index]), rows, np.clip(cosines, 0, 1)))
        if len(hits) == k:
            break
    return hits


def search_patches(
    archive: Archive, query_features: np.ndarray, k: int, skip: set[int]
) -> list[list[PatchHit]]:
    """For each query patch, the k most similar archive patches, best first: similarity is
    the cosine (clipped to [0, 1]) or, for an L2 index, 1 / (1 + distance)."""
    index, mapping = archive.index()
    records = {r.id: r for r in archive.slides()}
    skipped = sum(records[i].n_patches for i in skip if i in records)
    depth = min(index.ntotal, k + skipped)  # deep enough that k survive the exclusions
    scores, rows = index.search(archive.index_vectors(query_features), depth)
    # IndexFlatL2 returns squared distances
    sims = 1 / (1 + np.sqrt(scores)) if archive.index_metric == "l2" else np.clip(scores, 0, 1)
    results = []
    for row_sims, row_ids in zip(sims, rows, strict=True):
        hits = []
        for sim, row in zip(row_sims.tolist(), row_ids.tolist(), strict=True):
            slide_id, row_in_slide = mapping[row]
            if row < 0 or slide_id in skip:
                continue
            hits.append(PatchHit(records[int(slide_id)], int(row_in_slide), float(sim)))
            if len(hits) == k:
                break
        results.append(hits)
    return results


def embed_query(
    archive: Archive,
    path: Path,
    weights: Path | None = None,
    mpp: float | None = None,
    objective_power: float | None = None,
) -> np.ndarray:
    """Embed a query file exactly as the archive's slides were embedded."""
    from histosearch.embed import default_device, embed_path
    from histosearch.encoders import create_encoder

    settings = archive.settings
    encoder = create_encoder(settings["encoder"], weights).to(default_device())
    archive.check(dim=encoder.dim)
    features, _, _ = embed_path(
        path,
        encoder,
        float(settings["magnification"]),
        int(settings["tile_size"]),
        settings["tissue"],
        mpp=mpp,
        objective_power=objective_power,
    )
    return features
