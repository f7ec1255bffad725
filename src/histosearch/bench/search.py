"""`histosearch bench search`: the paper's Table I, leave-one-out slide search over a synthetic
archive of its scale (88 slides, the patches per magnification it reports)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from histosearch.bench.common import peak_rss_gb

# Table I of Afshari & Tizhoosh: 88 TCGA slides, patches per magnification, 35 h on CPU at 10x.
PAPER_PATCHES = {1.0: 4_668, 2.5: 22_989, 5.0: 84_596, 10.0: 319_563}
PAPER_SLIDES = 88


def synthetic_archive(
    n_patches: int, dim: int, n_slides: int = PAPER_SLIDES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative (ReLU-like) float32 embeddings split into `n_slides` slides of uneven
    size (log-normal, as real slides vary), with their row offsets."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.6, n_slides)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * n_patches)).astype(np.int64)
    sizes[-1] += n_patches - sizes.sum()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    features = rng.standard_normal((n_patches, dim), dtype=np.float32)
    return np.abs(features, out=features), offsets


# The paper's CPU runtimes of Table I (10-core Intel 9900X), in seconds.
PAPER_CPU_SECONDS = {
    (1.0, 2048): 60,
    (2.5, 2048): 180,
    (5.0, 2048): 600,
    (10.0, 2048): 35 * 3600,
    (1.0, 128): 60,
    (2.5, 128): 120,
    (5.0, 128): 480,
    (10.0, 128): 30 * 3600,
}


@dataclass(frozen=True)
class SearchBenchmark:
    """Leave-one-out slide search over a synthetic archive of the paper's shape."""

    magnification: float
    dim: int
    patches: int
    dtype: str
    seconds: float
    peak_rss_gb: float

    @property
    def paper_seconds(self) -> float:
        return PAPER_CPU_SECONDS[(self.magnification, self.dim)]


def bench_search(magnification: float, dim: int, dtype: str = "float32") -> SearchBenchmark:
    """Time the full leave-one-out search (every slide against every other) at the paper's
    scale for one magnification and embedding size."""
    import torch

    from histosearch.search.similarity import similarity_matrix

    features, offsets = synthetic_archive(PAPER_PATCHES[magnification], dim)
    start = time.perf_counter()
    matrix = similarity_matrix(features, offsets, getattr(torch, dtype))
    np.argsort(-matrix, axis=1)  # the rankings the search returns
    seconds = time.perf_counter() - start
    return SearchBenchmark(magnification, dim, len(features), dtype, seconds, peak_rss_gb())


def search_agreement(dtype: str = "float32") -> tuple[float, bool]:
    """On a small case, the largest difference between the blocked search and the measure
    computed pair by pair, and whether every top-5 ranking is identical."""
    import torch

    from histosearch.search.similarity import pairwise_similarity_matrix, similarity_matrix

    features, offsets = synthetic_archive(3000, 128, n_slides=24, seed=1)
    blocked = similarity_matrix(features, offsets, getattr(torch, dtype))
    plain = pairwise_similarity_matrix(features, offsets)
    same = bool((np.argsort(-blocked, 1)[:, :6] == np.argsort(-plain, 1)[:, :6]).all())
    return float(np.abs(blocked - plain).max()), same
