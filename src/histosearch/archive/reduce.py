"""Feature reduction fit on an archive: the paper's coefficient-of-variation selection, or PCA."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Self

import numpy as np

from histosearch.fileio import atomic_path


class CoVSelector:
    """Keep the `n_features` embedding elements with the largest coefficient of variation
    sigma_j / mean_j over the fitted patches (Afshari & Tizhoosh, section III)."""

    kind = "cov"

    def __init__(self, n_features: int = 128) -> None:
        self.n_features = n_features
        self.indices: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> Self:
        features = np.asarray(features, dtype=np.float64)
        if self.n_features > features.shape[1]:
            raise ValueError(f"cannot keep {self.n_features} of {features.shape[1]} features")
        mean, std = features.mean(axis=0), features.std(axis=0)
        # A feature that is always 0 (a dead ReLU) has no variation to speak of.
        cov = np.where(np.abs(mean) > 1e-12, std / np.maximum(np.abs(mean), 1e-12), 0.0)
        self.indices = np.sort(np.argsort(-cov, kind="stable")[: self.n_features])
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        if self.indices is None:
            raise RuntimeError("fit the selector first")
        return np.asarray(features, dtype=np.float32)[:, self.indices]

    def state(self) -> dict[str, np.ndarray]:
        return {"indices": self.indices}

    def load(self, state: dict[str, np.ndarray]) -> Self:
        self.indices = state["indices"]
        self.n_features = len(self.indices)
        return self


class PCAReducer:
    """Project onto the `n_features` principal components of the fitted patches."""

    kind = "pca"

    def __init__(self, n_features: int = 128) -> None:
        self.n_features = n_features
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> Self:
        features = np.asarray(features, dtype=np.float64)
        if self.n_features > features.shape[1]:
            raise ValueError(
                f"cannot keep {self.n_features} components of {features.shape[1]}-d features"
            )
        self.mean = features.mean(axis=0)
        centred = features - self.mean
        # The eigenvectors of the d x d covariance: the SVD of the n x d features gives the
        # same directions at O(n d^2) too, but several times slower for n >> d.
        values, vectors = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(values)[::-1][: min(self.n_features, len(features))]
        kept = vectors[:, order].T
        # one sign per direction, whatever the solver returns: its largest element positive
        biggest = np.abs(kept).argmax(axis=1)
        kept *= np.sign(kept[np.arange(len(kept)), biggest])[:, None]
        # Fewer patches than components (a small first batch): the missing directions are
        # zero, so every vector keeps the archive's dimension; `reindex` refits on more.
        self.components = np.zeros((self.n_features, features.shape[1]))
        self.components[: len(kept)] = kept
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        if self.components is None or self.mean is None:
            raise RuntimeError("fit the reducer first")
        return ((np.asarray(features, np.float64) - self.mean) @ self.components.T).astype(
            np.float32
        )

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "components": self.components}

    def load(self, state: dict[str, np.ndarray]) -> Self:
        self.mean, self.components = state["mean"], state["components"]
        self.n_features = len(self.components)
        return self


Reducer = CoVSelector | PCAReducer
REDUCERS: dict[str, type[CoVSelector] | type[PCAReducer]] = {"cov": CoVSelector, "pca": PCAReducer}


def make_reducer(kind: str, n_features: int) -> Reducer:
    """A reducer by kind: `cov` (the paper's) or `pca`."""
    if kind not in REDUCERS:
        raise ValueError(f"unknown reduction {kind!r}; choose from {sorted(REDUCERS)} or none")
    return REDUCERS[kind](n_features)


def save_reducer(reducer: Reducer, target: Path | BinaryIO) -> None:
    """Write a fitted reducer to a file (atomically) or into an open binary stream."""
    if isinstance(target, Path):
        with atomic_path(target) as tmp, tmp.open("wb") as file:
            save_reducer(reducer, file)
        return
    np.savez(target, kind=reducer.kind, **reducer.state())


def load_reducer(source: Path | BinaryIO) -> Reducer:
    """A reducer saved by `save_reducer`."""
    with np.load(source) as data:
        state = {k: data[k] for k in data.files if k != "kind"}
        kind = str(data["kind"])
    return REDUCERS[kind]().load(state)
