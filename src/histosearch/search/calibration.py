"""Readable scores: where a similarity falls among the archive's own nearest-neighbour
similarities, measured when the archive is built or grown.

A hit at the 50th percentile is as similar to the query as a typical archived patch (or slide)
is to its nearest neighbour in another slide; a top hit at the 2nd percentile says that
nothing in the archive is much like the query, whatever its bare cosine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from histosearch.search.similarity import similarity_matrix
from histosearch.search.two_stage import rank_slides

if TYPE_CHECKING:
    from histosearch.archive.view import SearchView
    from histosearch.search.patch_index import PatchIndex
    from histosearch.search.two_stage import Sketches

# Neighbours looked at per sampled patch to find its best one in another slide.
DEPTH = 64


def measure_calibration(
    view: SearchView,
    index: PatchIndex,
    max_slides: int,
    max_patches: int,
    seed: int = 0,
    sketches: Sketches | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted similarities of sampled patches and slides to their nearest neighbour in
    another slide of the whole archive: patches through the patch index; slides by the WSI
    measure, all against all when the archive has at most `max_slides` slides, else each of
    `max_slides` sampled slides ranked against every other by the two-stage search (the
    nearest among a sample would read low, and percentiles high, in a large archive)."""
    rng = np.random.default_rng(seed)
    n = len(view.vectors)
    rows = np.sort(rng.choice(n, min(n, max_patches), replace=False))
    sims, found = index.search(np.asarray(view.vectors[rows], np.float32), min(n, DEPTH))
    other = (found >= 0) & (view.row_slide[np.maximum(found, 0)] != view.row_slide[rows][:, None])
    patch_nn = np.where(other, sims, -np.inf).max(axis=1)
    patch_nn = np.sort(patch_nn[np.isfinite(patch_nn)])

    n_slides = len(view.records)
    if n_slides < 2:
        return patch_nn, np.empty(0)
    if n_slides <= max_slides:
        matrix = similarity_matrix(np.asarray(view.vectors), view.offsets, torch.float32)
        np.fill_diagonal(matrix, -np.inf)
        return patch_nn, np.sort(matrix.max(axis=1))
    chosen = np.sort(rng.choice(n_slides, max_slides, replace=False))
    slide_nn = [
        rank_slides(
            view.vectors,
            view.offsets,
            np.asarray(view.vectors[view.offsets[s] : view.offsets[s + 1]], np.float32),
            1,
            [s],
            index,
            sketches=sketches,
        )[1][0]
        for s in chosen
    ]
    return patch_nn, np.sort(np.asarray(slide_nn))


def percentile(similarity: float, reference: np.ndarray) -> float | None:
    """The share (0-100) of the archive's nearest-neighbour similarities at or below
    `similarity`; None when none were measured."""
    if len(reference) == 0:
        return None
    return float(100 * np.searchsorted(reference, similarity, side="right") / len(reference))
