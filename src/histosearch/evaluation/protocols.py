"""The papers' evaluation protocols on a labelled set's embeddings: leave-one-out patch
retrieval, ADDR, pair verification and a linear probe; slide retrieval with the WSI measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histosearch.archive.reduce import make_reducer
from histosearch.evaluation.labelled import LabelledSet
from histosearch.evaluation.metrics import (
    DistanceAgreement,
    addr,
    agreement_by_distance,
    label_agreement,
    label_pairs,
    linear_probe,
    pair_verification,
    rank_neighbours,
    retrieval_metrics,
    spatial_pairs,
)
from histosearch.search.similarity import l2_normalize, similarity_matrix

RANK_GALLERY_DEPTH = 10


@dataclass
class PatchEvaluation:
    """The patch protocol's results and what produced them."""

    metrics: dict[str, object]
    per_class: dict[str, dict[str, float]]
    neighbours: np.ndarray
    votes: list[object]
    # label agreement of same-slide pairs by distance, when the set has slides and x, y
    spatial_agreement: DistanceAgreement | None = None


def evaluate_patches(
    features: np.ndarray,
    data: LabelledSet,
    ks: Sequence[int],
    exclude: str | None,
    metric: str,
    n_pairs: int,
    near_far: tuple[float, float] | None,
    seed: int,
) -> PatchEvaluation:
    """Leave-one-out kNN retrieval, ADDR and pair verification on patch embeddings."""
    keys = data.column(exclude) if exclude else None
    neighbours, _ = rank_neighbours(features, max(*ks, RANK_GALLERY_DEPTH), keys, metric)
    result = retrieval_metrics(data.labels, neighbours, ks, keys)
    metrics: dict[str, object] = dict(result.as_dict())
    similar, dissimilar = label_pairs(data.labels, n_pairs, keys, seed)
    unit = l2_normalize(features)  # so that ADDR compares encoders of any scale alike
    metrics["ADDR (label pairs)"] = addr(unit, similar, dissimilar)
    verification = pair_verification(features, similar, dissimilar, seed)
    metrics |= {
        "verification threshold": verification.threshold,
        "verification accuracy": verification.test_accuracy,
        "verification ROC AUC": verification.roc_auc,
        "verification pairs": verification.n_pairs,
        "linear probe balanced accuracy": linear_probe(features, data.labels, keys),
    }
    slides = data.column("slide") or data.column("patient")
    spatial = None
    if data.xy is not None and slides is not None:
        spatial = agreement_by_distance(data.labels, slides, data.xy, seed=seed)
    if near_far is not None and data.xy is not None and slides is not None:
        near, far = spatial_pairs(slides, data.xy, near_far[0], near_far[1], n_pairs, seed)
        if len(near) and len(far):
            metrics["ADDR (near/far pairs)"] = addr(unit, near, far)
            metrics["near/far pairs"] = [len(near), len(far)]
            metrics["label agreement (near/far pairs)"] = [
                round(label_agreement(data.labels, pairs), 4) for pairs in (near, far)
            ]
    return PatchEvaluation(metrics, result.per_class, neighbours, result.votes[max(ks)], spatial)


def evaluate_slides(
    slide_features: list[np.ndarray],
    slide_labels: list[str],
    ks: Sequence[int],
    reductions: Sequence[tuple[str, int]],
    exclude_keys: list[str] | None = None,
) -> dict[str, dict[str, object]]:
    """Leave-one-out slide search with the WSI measure, for the full features and each
    reduction (kind, n_features) fit on all patches."""
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in slide_features])])
    stacked = np.concatenate(slide_features)
    variants = {f"full ({stacked.shape[1]}-d)": stacked}
    for kind, n_features in reductions:
        if n_features < stacked.shape[1]:
            reducer = make_reducer(kind, n_features).fit(stacked)
            variants[f"{kind} {n_features}-d"] = reducer.transform(stacked)
    results = {}
    keys = np.arange(len(slide_labels)) if exclude_keys is None else np.asarray(exclude_keys)
    for name, features in variants.items():
        matrix = similarity_matrix(features, offsets, torch.float32)
        matrix[keys[:, None] == keys[None, :]] = -np.inf  # itself and same-key slides
        order = np.argsort(-matrix, axis=1, kind="stable")[:, : max(ks)]
        neighbours = np.where(np.isfinite(np.take_along_axis(matrix, order, 1)), order, -1)
        metrics = retrieval_metrics(slide_labels, neighbours, ks, exclude_keys)
        results[name] = {**metrics.as_dict(), "slides": len(slide_labels)}
    return results
