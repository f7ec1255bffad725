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

# References are multiplied in chunks (whole slides) of about this many cosines against all the
# query patches at once: big enough for BLAS to run at full speed, small enough that the float32
# cosine block (16 MB) stays in cache for the reductions (measured: 2^22 against 2^25 cosines
# per chunk, 10 queries on 65k rows in bfloat16, 7.4 s against 16 s on the loaded machine).
CHUNK_COSINES = 1 << 22


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float32).tiny)


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
    """sim(query q, slide k) for every query and k in first..last-1, (queries x slides): one
    matrix product per chunk of slides against all the queries' patches together.

    Each query is padded to the longest with copies of its first patch (a copy changes no
    maximum; the means leave them out), so that the maxima within each query are one
    reduction over a (rows, queries, longest) view; the maxima within each slide are one
    reduction over its rows. Both run in float32 on the product, whatever its dtype.
    """
    sizes = torch.tensor([len(q) for q in queries])
    longest = int(sizes.max())
    together = torch.cat([torch.cat([q, q[:1].expand(longest - len(q), -1)]) for q in queries])
    own = (torch.arange(longest)[None] < sizes[:, None]).float()  # (queries, longest)
    sims = np.empty((len(queries), last - first))
    rows = max(CHUNK_COSINES // len(together), 1)
    for chunk_first, chunk_last in _chunks(offsets, first, last, rows):
        base = offsets[chunk_first]
        cosines = (features[base : offsets[chunk_last]] @ together.T).float()
        local = (offsets[chunk_first : chunk_last + 1] - base).tolist()
        # row max of S within each slide, then its mean over each query's own patches
        best_for_query = torch.stack([cosines[a:b].amax(0) for a, b in itertools.pairwise(local)])
        best_for_query = best_for_query.view(len(best_for_query), len(queries), longest)
        query_side = (best_for_query * own).sum(2) / sizes
        # column max of S (each reference patch's best in each query), mean within each slide
        best_for_reference = cosines.view(len(cosines), len(queries), longest).amax(2).numpy()
        reference_side = np.add.reduceat(best_for_reference, local[:-1], axis=0)
        reference_side /= np.diff(local)[:, None]
        sims[:, chunk_first - first : chunk_last - first] = (
            0.5 * (query_side.numpy() + reference_side).T
        )
    return np.clip(sims, 0, 1)


def _as_tensor(features: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalised rows in `dtype`, converted a block at a time: no full float32 copy."""
    out = torch.empty(features.shape, dtype=dtype)
    step = max(CHUNK_COSINES // max(features.shape[1], 1), 1)  # 16 MB of float32 at a time
    for start in range(0, len(features), step):
        block = l2_normalize(features[start : start + step])
        out[start : start + len(block)] = torch.from_numpy(block)
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
    tensor = _as_tensor(features, dtype)
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
    tensor = _as_tensor(features, dtype)
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
    cosines = l2_normalize(query) @ l2_normalize(reference).T
    rows = cosines.argmax(axis=1)
    return rows, cosines[np.arange(len(rows)), rows], cosines.max(axis=0)
