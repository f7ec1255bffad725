from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from histosearch.bench.search import synthetic_archive
from histosearch.search.similarity import (
    best_matches,
    many_slide_similarities,
    pairwise_similarity_matrix,
    similarity_matrix,
    slide_similarities,
    wsi_similarity,
)


def reference_similarity(query: np.ndarray, reference: np.ndarray) -> float:
    """Equation (1)-(2) written out with loops, as the paper states it."""

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    s = [[cosine(q, r) for r in reference] for q in query]
    rows = sum(max(row) for row in s) / len(query)
    columns = sum(max(s[i][j] for i in range(len(query))) for j in range(len(reference))) / len(
        reference
    )
    return 0.5 * (rows + columns)


@pytest.fixture(scope="module")
def archive() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_archive(600, 24, n_slides=9, seed=3)


def test_agrees_with_the_equation_written_out(archive):
    features, offsets = archive
    a, b = features[offsets[0] : offsets[1]], features[offsets[4] : offsets[5]]
    assert wsi_similarity(a, b) == pytest.approx(
        reference_similarity(a.tolist(), b.tolist()), abs=1e-6
    )


def test_properties(archive):
    features, offsets = archive
    matrix = similarity_matrix(features, offsets)
    assert np.allclose(matrix, matrix.T)
    # the diagonal the matrix fills in is each slide's own WSI similarity to itself
    selves = [wsi_similarity(features[a:b], features[a:b]) for a, b in pairwise(offsets)]
    assert np.allclose(np.diag(matrix), selves, atol=1e-6)
    slide = features[offsets[2] : offsets[3]]
    assert wsi_similarity(slide, slide) == pytest.approx(1.0, abs=1e-6)
    # a slide made of a subset of another's patches matches those rows exactly
    rows, cosines, best_for_reference = best_matches(slide[:5], slide)
    assert rows.tolist() == [0, 1, 2, 3, 4] and np.allclose(cosines, 1)
    # and each reference patch's best cosine to the query: 1 for those five, below for others
    assert np.allclose(best_for_reference[:5], 1) and len(best_for_reference) == len(slide)
    assert best_for_reference[5:].max() < 1


def test_blocked_matrix_equals_pairwise_measure(archive, monkeypatch):
    features, offsets = archive
    # chunks of a slide or two against the query patches: many chunks
    monkeypatch.setattr("histosearch.search.similarity.CHUNK_COSINES", 2000)
    matrix = similarity_matrix(features, offsets)
    direct = pairwise_similarity_matrix(features, offsets)
    assert np.abs(matrix - direct).max() < 1e-6
    assert (
        np.abs(
            slide_similarities(features[offsets[3] : offsets[4]], features, offsets) - direct[3]
        ).max()
        < 1e-6
    )
    # several queries in one product: each row is that query's own scan
    queries = [features[offsets[q] : offsets[q + 1]] for q in (1, 3, 4)]
    together = many_slide_similarities(queries, features, offsets)
    assert np.abs(together - direct[[1, 3, 4]]).max() < 1e-6
    # bfloat16 chunks are padded to BF16_PADDED_ROWS rows: the rows past a chunk (the next
    # slides', then zeros past the last) are dropped, never counted
    bf16 = similarity_matrix(features, offsets, torch.bfloat16)
    assert np.abs(bf16 - direct).max() < 5e-3
    bf16_together = many_slide_similarities(queries, features, offsets, torch.bfloat16)
    assert np.abs(bf16_together - direct[[1, 3, 4]]).max() < 5e-3
    assert (np.argsort(-direct, axis=1)[:, :2] == np.argsort(-matrix, axis=1)[:, :2]).all()
