"""Retrieval evaluation: the four papers' protocols and metrics, numpy in, numbers out.

Rankings come from `rank_neighbours` (leave-one-out kNN that never returns the query itself,
nor anything sharing its exclusion key: group, patient or slide). Every metric then works on
the (n_queries x k) matrix of neighbour indices, padded with -1 where fewer than k candidates
remain.

Definitions (k = 1, 3, 5 by default):
- Acc@k: at least one of the top k has the query's label.
- MV@k: the majority label of the top k is the query's; a tie goes to the tied label ranked
  highest. mMV@k: MV@k averaged per class, then over classes (macro).
- AP@k: sum over ranks j <= k of precision@j at the relevant ranks, divided by
  min(k, number of relevant candidates); mAP@k its mean.
- Recall@k: relevant items in the top k over all relevant candidates of the query.
- eta_p, eta_w, eta_tot (Kimia Path24; Babaie et al. 2017, as the LGFFEM paper uses them):
  with a retrieval correct when the top-1 has the query's label (scan), eta_p = correct /
  all queries, eta_w = mean over labels of the correct fraction, eta_tot = eta_p * eta_w.
- ADDR (Gildenblat & Klaiman): mean L2 distance of dissimilar pairs over that of similar pairs.
- Linear probe (the self-supervised literature's check): a class-balanced logistic
  regression on standardised embeddings, cross-validated over folds that never split a
  group/patient; its balanced accuracy tells what a supervised read-out of the same
  embeddings reaches, next to what kNN retrieval does with them.
- Pair verification (Huang & Chen): same/different label decided by cosine >= threshold; the
  threshold maximising accuracy on a validation half of the pairs, accuracy on the other
  half, and the ROC AUC of the cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histosearch.search.consensus import majority_vote
from histosearch.search.similarity import l2_normalize

QUERY_BLOCK = 1024
# Random pairs drawn per pair asked for, from which the distinct ones are taken.
PAIR_DRAWS = 20


def rank_neighbours(
    features: np.ndarray,
    k: int,
    exclude_keys: Sequence[object] | None = None,
    metric: str = "cosine",
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out top-k neighbours of every row: (indices, similarities), -1 / nan padded.

    Rows sharing the query's exclusion key (its group or patient) are never returned; ties
    keep index order. `metric` is `cosine` or `l2` (similarity = -distance).
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"unknown metric {metric!r}; choose cosine or l2")
    x = l2_normalize(features) if metric == "cosine" else np.asarray(features, np.float32)
    n = len(x)
    keys = np.arange(n) if exclude_keys is None else _codes(exclude_keys)
    squared = (x**2).sum(axis=1)
    indices = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), np.nan, np.float32)
    for start in range(0, n, QUERY_BLOCK):
        stop = min(n, start + QUERY_BLOCK)
        block = x[start:stop] @ x.T
        if metric == "l2":
            block = -np.sqrt(np.maximum(squared[start:stop, None] + squared[None] - 2 * block, 0))
        block[keys[start:stop, None] == keys[None, :]] = -np.inf
        block[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        order = np.argsort(-block, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(block, order, axis=1)
        valid = np.isfinite(top)
        # a set of k or fewer items leaves the last columns padded
        indices[start:stop, : order.shape[1]] = np.where(valid, order, -1)
        sims[start:stop, : order.shape[1]] = np.where(valid, top, np.nan)
    return indices, sims


def _codes(values: Sequence[object]) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)[1]


@dataclass(frozen=True)
class RetrievalMetrics:
    """Every retrieval figure at each k, with the per-class MV@k and the votes behind them."""

    ks: tuple[int, ...]
    acc: dict[int, float]
    mv: dict[int, float]
    mmv: dict[int, float]
    map: dict[int, float]
    recall: dict[int, float]
    eta_p: float
    eta_w: float
    eta_tot: float
    per_class: dict[str, dict[str, float]]
    votes: dict[int, list[object]]

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for k in self.ks:
            out |= {f"Acc@{k}": self.acc[k], f"MV@{k}": self.mv[k], f"mMV@{k}": self.mmv[k]}
            out |= {f"mAP@{k}": self.map[k], f"Recall@{k}": self.recall[k]}
        return out | {"eta_p": self.eta_p, "eta_w": self.eta_w, "eta_tot": self.eta_tot}


def retrieval_metrics(
    labels: Sequence[object],
    neighbours: np.ndarray,
    ks: Sequence[int] = (1, 3, 5),
    exclude_keys: Sequence[object] | None = None,
) -> RetrievalMetrics:
    """All ranking metrics of `neighbours` (from `rank_neighbours`) against `labels`.

    `exclude_keys` must be those of the ranking, so that the relevant candidates counted for
    AP and recall are those the ranking could return.
    """
    labels_arr = np.asarray(labels, dtype=object).astype(str)
    n = len(labels_arr)
    keys = np.arange(n) if exclude_keys is None else _codes(exclude_keys)
    classes = sorted(set(labels_arr))
    # relevant candidates per query: same label, other key, not itself
    relevant_total = np.zeros(n, np.int64)
    for cls in classes:
        members = labels_arr == cls
        member_keys, per_key = np.unique(keys[members], return_counts=True)
        same_key = dict(zip(member_keys.tolist(), per_key.tolist(), strict=True))
        relevant_total[members] = members.sum() - np.array([same_key[key] for key in keys[members]])
    padded = neighbours >= 0
    hit = padded & (labels_arr[np.maximum(neighbours, 0)] == labels_arr[:, None])
    acc, mv, mmv, map_, recall, votes = {}, {}, {}, {}, {}, {}
    per_class: dict[str, dict[str, float]] = {cls: {} for cls in classes}
    for k in ks:
        top = hit[:, :k]
        acc[k] = float(top.any(axis=1).mean())
        vote = [majority_vote([labels_arr[j] for j in row[:k] if j >= 0]) for row in neighbours]
        correct = np.array([v == label for v, label in zip(vote, labels_arr, strict=True)])
        mv[k] = float(correct.mean())
        class_mv = {cls: float(correct[labels_arr == cls].mean()) for cls in classes}
        mmv[k] = float(np.mean(list(class_mv.values())))
        precision_at = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
        denominator = np.minimum(k, relevant_total)
        ap = np.where(
            denominator > 0, (precision_at * top).sum(axis=1) / np.maximum(denominator, 1), 0.0
        )
        map_[k] = float(ap.mean())
        recall[k] = float(
            np.where(
                relevant_total > 0, top.sum(axis=1) / np.maximum(relevant_total, 1), 0.0
            ).mean()
        )
        votes[k] = vote
        for cls in classes:
            members = labels_arr == cls
            per_class[cls] |= {
                "n": float(members.sum()),
                f"Acc@{k}": float(top[members].any(axis=1).mean()),
                f"MV@{k}": class_mv[cls],
                f"mAP@{k}": float(ap[members].mean()),
            }
    first = hit[:, 0] if hit.shape[1] else np.zeros(n, bool)
    eta_p = float(first.mean())
    eta_w = float(np.mean([first[labels_arr == cls].mean() for cls in classes]))
    return RetrievalMetrics(
        tuple(ks), acc, mv, mmv, map_, recall, eta_p, eta_w, eta_p * eta_w, per_class, votes
    )


def addr(features: np.ndarray, similar: np.ndarray, dissimilar: np.ndarray) -> float:
    """Average Descriptor Distance Ratio: mean L2 distance of dissimilar pairs over similar."""
    if len(similar) == 0 or len(dissimilar) == 0:
        raise ValueError("ADDR needs both similar and dissimilar pairs")
    x = np.asarray(features, np.float64)

    def mean_distance(pairs: np.ndarray) -> float:
        return float(np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1).mean())

    return mean_distance(dissimilar) / mean_distance(similar)


def linear_probe(
    features: np.ndarray,
    labels: Sequence[object],
    groups: Sequence[object] | None = None,
    folds: int = 5,
    regularisation: float = 0.01,
) -> float | None:
    """Balanced accuracy of a class-balanced logistic regression (inverse regularisation
    `regularisation`) predicting each item from folds that hold out whole groups; None when
    there are fewer than two groups (or items) to split."""
    labels_arr = np.asarray(labels, dtype=object).astype(str)
    codes = np.arange(len(labels_arr)) if groups is None else _codes(groups)
    n_folds = min(folds, int(codes.max()) + 1)
    if n_folds < 2 or len(set(labels_arr)) < 2:
        return None
    predicted = np.empty_like(labels_arr)
    for train, test in GroupKFold(n_folds).split(features, labels_arr, codes):
        if len(set(labels_arr[train])) < 2:
            return None
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=regularisation, class_weight="balanced", max_iter=2000),
        )
        predicted[test] = model.fit(features[train], labels_arr[train]).predict(features[test])
    return float(balanced_accuracy_score(labels_arr, predicted))


def label_agreement(labels: Sequence[object], pairs: np.ndarray) -> float:
    """Fraction of the pairs whose two items share a label (how well a pair rule, such as
    spatial nearness, stands in for the labels)."""
    labels_arr = np.asarray(labels, dtype=object).astype(str)
    return float((labels_arr[pairs[:, 0]] == labels_arr[pairs[:, 1]]).mean())


@dataclass(frozen=True)
class DistanceAgreement:
    """Label agreement of same-slide pairs, binned by their distance (the coordinates' units)."""

    edges: np.ndarray
    agreement: np.ndarray
    pairs: np.ndarray

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "edges": self.edges.tolist(),
            "agreement": self.agreement.tolist(),
            "pairs": self.pairs.tolist(),
        }


def agreement_by_distance(
    labels: Sequence[object],
    slides: Sequence[object],
    xy: np.ndarray,
    n_bins: int = 12,
    max_per_slide: int = 2000,
    seed: int = 0,
) -> DistanceAgreement | None:
    """How often two tiles of one slide share a label, as a function of their distance: what
    a spatial near/far rule (Gildenblat & Klaiman) can teach about the labels. Log-spaced
    bins; slides with more than `max_per_slide` tiles are subsampled. None without pairs."""
    labels_arr = np.asarray(labels, dtype=object).astype(str)
    codes, xy = _codes(slides), np.asarray(xy, np.float64)
    rng = np.random.default_rng(seed)
    distances, same = [], []
    for code in range(codes.max() + 1):
        members = np.flatnonzero(codes == code)
        if len(members) > max_per_slide:
            members = rng.choice(members, max_per_slide, replace=False)
        first, second = np.triu_indices(len(members), 1)
        a, b = members[first], members[second]
        distances.append(np.linalg.norm(xy[a] - xy[b], axis=1))
        same.append(labels_arr[a] == labels_arr[b])
    distance, agree = np.concatenate(distances), np.concatenate(same)
    distance, agree = distance[distance > 0], agree[distance > 0]
    if len(distance) == 0:
        return None
    edges = np.geomspace(distance.min(), distance.max() * (1 + 1e-9), n_bins + 1)
    index = np.digitize(distance, edges) - 1
    pairs = np.bincount(index, minlength=n_bins)
    agreeing = np.bincount(index, weights=agree, minlength=n_bins)
    return DistanceAgreement(edges, agreeing / np.maximum(pairs, 1), pairs)


def label_pairs(
    labels: Sequence[object],
    n_pairs: int,
    exclude_keys: Sequence[object] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `n_pairs` distinct random same-label pairs and as many different-label pairs,
    never two items sharing an exclusion key (group/patient), so near-duplicates do not count
    as similar. A set with fewer pairs than asked gives each of its pairs once."""
    labels_arr = np.asarray(labels, dtype=object).astype(str)
    n = len(labels_arr)
    keys = np.arange(n) if exclude_keys is None else _codes(exclude_keys)
    rng = np.random.default_rng(seed)
    if n * (n - 1) // 2 <= n_pairs * PAIR_DRAWS:  # every pair, shuffled
        candidates = np.stack(np.triu_indices(n, 1), axis=1)
        candidates = candidates[rng.permutation(len(candidates))]
    else:  # random draws, each pair kept once in the order drawn
        drawn = np.sort(rng.integers(0, n, size=(n_pairs * PAIR_DRAWS, 2)), axis=1)
        candidates = drawn[np.sort(np.unique(drawn, axis=0, return_index=True)[1])]
    candidates = candidates[keys[candidates[:, 0]] != keys[candidates[:, 1]]]
    same = labels_arr[candidates[:, 0]] == labels_arr[candidates[:, 1]]
    return candidates[same][:n_pairs], candidates[~same][:n_pairs]


def spatial_pairs(
    slides: Sequence[object],
    xy: np.ndarray,
    near: float,
    far: float,
    n_pairs: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of tiles of the same slide at most `near` apart (similar) and at least `far`
    apart (dissimilar), in the coordinates' units (Gildenblat & Klaiman's near/far)."""
    slide_codes = _codes(slides)
    xy = np.asarray(xy, np.float64)
    rng = np.random.default_rng(seed)
    similar, dissimilar = [], []
    for code in rng.permutation(slide_codes.max() + 1):
        members = np.flatnonzero(slide_codes == code)
        if len(members) < 2:
            continue
        distance = np.linalg.norm(xy[members, None] - xy[None, members], axis=2)
        upper = np.triu(np.ones_like(distance, bool), 1)
        similar.append(members[np.argwhere(upper & (distance <= near))])
        dissimilar.append(members[np.argwhere(upper & (distance >= far))])
    similar_all = np.concatenate(similar) if similar else np.zeros((0, 2), np.int64)
    dissimilar_all = np.concatenate(dissimilar) if dissimilar else np.zeros((0, 2), np.int64)
    return (
        similar_all[rng.permutation(len(similar_all))[:n_pairs]],
        dissimilar_all[rng.permutation(len(dissimilar_all))[:n_pairs]],
    )


@dataclass(frozen=True)
class Verification:
    """Same/different decision by cosine threshold (Huang & Chen)."""

    threshold: float
    validation_accuracy: float
    test_accuracy: float
    roc_auc: float
    n_pairs: int


def pair_verification(
    features: np.ndarray, similar: np.ndarray, dissimilar: np.ndarray, seed: int = 0
) -> Verification:
    """Pick the cosine threshold on a random half of the pairs, report accuracy on the other."""
    x = l2_normalize(features)
    pairs = np.concatenate([similar, dissimilar])
    same = np.concatenate([np.ones(len(similar), bool), np.zeros(len(dissimilar), bool)])
    cosine = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(axis=1)
    order = np.random.default_rng(seed).permutation(len(pairs))
    validation, test = order[: len(order) // 2], order[len(order) // 2 :]
    threshold, validation_accuracy = best_threshold(cosine[validation], same[validation])
    test_accuracy = float(((cosine[test] >= threshold) == same[test]).mean())
    return Verification(
        threshold,
        validation_accuracy,
        test_accuracy,
        float(roc_auc_score(same, cosine)),
        len(pairs),
    )


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising accuracy of `score >= t` (midway between scores), and it."""
    order = np.argsort(scores)
    sorted_scores, sorted_same = scores[order], same[order]
    # predicting "same" for everything from index i on: correct = different below + same above
    different_below = np.concatenate([[0], np.cumsum(~sorted_same)])
    same_above = np.concatenate([np.cumsum(sorted_same[::-1])[::-1], [0]])
    correct = different_below + same_above
    best = int(np.argmax(correct))
    if best == 0:
        threshold = sorted_scores[0] - 1e-6
    elif best == len(scores):
        threshold = sorted_scores[-1] + 1e-6
    else:
        threshold = (sorted_scores[best - 1] + sorted_scores[best]) / 2
    return float(threshold), float(correct[best] / len(scores))
