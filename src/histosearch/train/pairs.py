"""Spatial pairs (Gildenblat & Klaiman): tiles near each other on a slide are similar, far
apart dissimilar. Distances are in micrometres so that they mean the same at any scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histosearch.errors import HistosearchError

# The paper: 1792 px and 9408 px at 10x (1 um/px): 2 mm-ish near, 10 mm-ish far.
PAPER_NEAR_UM = 1792.0
PAPER_FAR_UM = 9408.0


class PairError(HistosearchError):
    """The tiles cannot give the pairs asked for."""


def sample_spatial_pairs(
    slides: Sequence[object],
    xy_um: np.ndarray,
    near_um: float = PAPER_NEAR_UM,
    far_um: float = PAPER_FAR_UM,
    n_near: int = 32,
    n_far: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """For every tile, up to `n_near` partners of its own slide at most `near_um` away
    (label 0, similar) and up to `n_far` of its own slide at least `far_um` away (label 1).

    Returns (pairs (m, 2) of tile indices, labels (m,)). Pairs never cross slides.
    """
    xy = np.asarray(xy_um, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != len(slides) or not np.isfinite(xy).all():
        raise PairError(None, "every tile needs finite x, y coordinates")
    if not 0 < near_um < far_um:
        raise PairError(None, f"need 0 < near ({near_um}) < far ({far_um}) micrometres")
    codes = np.unique(np.asarray(slides, dtype=object).astype(str), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    pairs, labels = [], []
    for code in range(codes.max() + 1):
        members = np.flatnonzero(codes == code)
        distance = np.linalg.norm(xy[members, None] - xy[None, members], axis=2)
        for row, anchor in enumerate(members):
            near = members[(distance[row] <= near_um) & (members != anchor)]
            far = members[distance[row] >= far_um]
            for partners, label, count in ((near, 0, n_near), (far, 1, n_far)):
                chosen = rng.choice(partners, min(count, len(partners)), replace=False)
                pairs += [(anchor, partner) for partner in chosen]
                labels += [label] * len(chosen)
    pairs_arr = np.array(pairs, np.int64).reshape(-1, 2)
    labels_arr = np.array(labels, np.int64)
    n_similar, n_dissimilar = int((labels_arr == 0).sum()), int((labels_arr == 1).sum())
    if n_similar == 0 or n_dissimilar == 0:
        raise PairError(
            None,
            f"{len(xy)} tiles on {codes.max() + 1} slides give {n_similar} near "
            f"(<= {near_um:g} um) and {n_dissimilar} far (>= {far_um:g} um) pairs; both are needed",
        )
    return pairs_arr, labels_arr
