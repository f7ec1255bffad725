"""The WSI-to-WSI similarity of Afshari & Tizhoosh, blocked and vectorised.

For slides with L2-normalised patch embeddings Q (n_q x d) and R (n_r x d), S = Q R^T holds the
patch cosines and

    sim(Q, R) = 0.5 * (mean_i max_j S_ij + mean_j max_i S_ij)          (eq. 1-2)

It is symmetric and 1 for a slide against itself. Slides are stored back to back in one
matrix, slide k owning rows offsets[k]:offsets[k+1].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

# References are multiplied in chunks (whole slides) of about this many cosines against each
# query: big enough for BLAS to run at full speed, small enough that the float32 cosine block
# (2 MB) stays in the cache for its reductions.
CHUNK_COSINES = 1 << 19
# Rows normalised at a time (16 MB of 128-d float32).
NORMALISED_ROWS = 1 << 15
# oneDNN compiles a bfloat16 product for each new shape, which costs three times the product
# itself at these sizes: bfloat16 chunks are multiplied padded to a multiple of this many rows
# (a few shapes, each compiled once), the rows past the chunk computed and dropped.
BF16_PADDED_ROWS = 256


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32: by `_as_tensor`, the
    normaliser of every product here."""
    return _as_tensor(np.asarray(features), torch.float32).numpy()


def wsi_similarity(query: np.ndarray, reference: np.ndarray) -> float:
    """Equation (1)-(2) for two slides' patch embeddings (not necessarily normalised)."""
    cosines = l2_normalize(query) @ l2_normalize(reference).T
    return float(np.clip(0.5 * (cosines.max(axis=1).mean() + cosines.max(axis=0).mean()), 0, 1))


def _chunks(offsets: np.ndarray, first: int, last: int, rows: int) -> list[tuple[int, int]]:
    """Split slides first..last-1 into runs of about `rows` patches (whole slides)."""
    runs, start = [], first
    for k in range(first, last):
        if offsets[k + 1] - offsets[start] >= rows or k == last - 1:
            runs.append((start, k + 1))
            start = k + 1
    return runs


def _similarities(
    queries: Sequence[torch.Tensor],
    features: torch.Tensor,
    offsets: np.ndarray,
    first: int,
    last: int,
) -> np.ndarray:
    """sim(query q, slide k) for every query and k in first..last-1, (queries x slides).

    The slides are read in chunks (whole slides) of about CHUNK_COSINES cosines against the
    longest query, and each query is multiplied with a chunk on its own, so that its cosine
    block stays in the cache for its two reductions: the maximum within each slide's rows
    and the maximum within the query. A bfloat16 `features` ends with `_padding` - 1 rows
    past the slides (`_as_tensor`'s extra rows).
    """
    sims = np.empty((len(queries), last - first))
    rows = max(CHUNK_COSINES // max(len(q) for q in queries), 1)
    padding = _padding(features.dtype)
    for chunk_first, chunk_last in _chunks(offsets, first, last, rows):
        base, n_rows = offsets[chunk_first], offsets[chunk_last] - offsets[chunk_first]
        block = features[base : base + -(-n_rows // padding) * padding]
        local = (offsets[chunk_first : chunk_last + 1] - base).tolist()
        sizes = np.diff(local)
        for q, query in enumerate(queries):
            cosines = (block @ query.T)[:n_rows].float()
            # row max of S within each slide, then its mean over the query's patches
            best_for_query = [cosines[a:b].amax(0).mean() for a, b in itertools.pairwise(local)]
            # column max of S (each reference patch's best in the query), mean within each slide
            best_for_reference = cosines.amax(1).numpy()
            reference_side = np.add.reduceat(best_for_reference, local[:-1]) / sizes
            sims[q, chunk_first - first : chunk_last - first] = 0.5 * (
                torch.stack(best_for_query).numpy() + reference_side
            )
    return np.clip(sims, 0, 1)


def _padding(dtype: torch.dtype) -> int:
    return BF16_PADDED_ROWS if dtype == torch.bfloat16 else 1


def _as_tensor(features: np.ndarray, dtype: torch.dtype, extra_rows: int = 0) -> torch.Tensor:
    """L2-normalised rows in `dtype`, converted a block at a time: no full float32 copy;
    followed by `extra_rows` zero rows (the padding `_similarities` may read)."""
    out = torch.empty((len(features) + extra_rows, features.shape[1]), dtype=dtype)
    out[len(features) :] = 0
    step = max(NORMALISED_ROWS, 1)
    for start in range(0, len(features), step):
        block = torch.from_numpy(np.array(features[start : start + step], np.float32))
        norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
        out[start : start + len(block)] = block / norms.clamp_min(torch.finfo(torch.float32).tiny)
    return out


def slide_similarities(
    query: np.ndarray,
    features: np.ndarray,
    offsets: np.ndarray,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """sim(query slide, slide k) for every slide k of a back-to-back feature matrix."""
    return many_slide_similarities([query], features, offsets, dtype)[0]


def many_slide_similarities(
    queries: Sequence[np.ndarray],
    features: np.ndarray,
    offsets: np.ndarray,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """sim(query q, slide k) for every query and every slide, (queries x slides): the
    features are normalised and converted once for all the queries."""
    offsets = np.asarray(offsets)
    tensor = _as_tensor(features, dtype, _padding(dtype) - 1)
    return _similarities(
        [_as_tensor(q, dtype) for q in queries], tensor, offsets, 0, len(offsets) - 1
    )


def similarity_matrix(
    features: np.ndarray, offsets: np.ndarray, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """The symmetric (n_slides x n_slides) similarity of every pair, each pair computed once.

    This is the leave-one-out search of the paper: row k ranks the other slides for query k.
    `dtype=torch.bfloat16` halves the time on CPUs with bf16 units, at ~1e-3 precision.
    """
    offsets = np.asarray(offsets)
    n = len(offsets) - 1
    tensor = _as_tensor(features, dtype, _padding(dtype) - 1)
    matrix = np.eye(n)
    for q in range(n - 1):
        row = _similarities([tensor[offsets[q] : offsets[q + 1]]], tensor, offsets, q + 1, n)[0]
        matrix[q, q + 1 :] = matrix[q + 1 :, q] = row
    return matrix


def pairwise_similarity_matrix(features: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The plain reference for `similarity_matrix`: `wsi_similarity` on every ordered pair."""
    slides = [features[a:b] for a, b in itertools.pairwise(offsets)]
    return np.array([[wsi_similarity(q, r) for r in slides] for q in slides])


def best_matches(
    query: np.ndarray, reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every query patch its most similar reference patch (row, cosine), and for every
    reference patch its best cosine to any query patch."""
    # by torch, as the measure is: numpy's BLAS threads would spin against torch's
    cosines = (_as_tensor(query, torch.float32) @ _as_tensor(reference, torch.float32).T).numpy()
    rows = cosines.argmax(axis=1)
    return rows, cosines[np.arange(len(rows)), rows], cosines.max(axis=0)
