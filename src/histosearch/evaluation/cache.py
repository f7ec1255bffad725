"""The embeddings an `eval` keeps beside its report, reused by the next run into the same folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosearch.fileio import atomic_path

EMBEDDINGS = "embeddings.npz"


def embedding_key(encoder_name: str, weights: Path | None) -> str:
    """What a set's embeddings depend on: the encoder, and the size and time of the files
    its weights come from (a retrained checkpoint gets a new key)."""
    parts = [encoder_name, str(weights)]
    for candidate in (Path(encoder_name), weights):
        if candidate is not None and candidate.is_file():
            stat = candidate.stat()
            parts.append(f"{candidate.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def cached_embeddings(out: Path, key: str, paths: Sequence[Path]) -> np.ndarray | None:
    """The embeddings an earlier `eval` into `out` saved for the same encoder and files."""
    path = out / EMBEDDINGS
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            if str(stored["key"]) == key and stored["paths"].tolist() == [str(p) for p in paths]:
                return stored["features"]
    except Exception:  # an unreadable cache is only a cache: embed again
        return None
    return None


def save_embeddings(out: Path, key: str, paths: Sequence[Path], features: np.ndarray) -> None:
    """Keep a set's embeddings beside its report, for the next `eval` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / EMBEDDINGS) as tmp, tmp.open("wb") as file:
        names = np.array([str(p) for p in paths])
        np.savez(file, key=np.array(key), paths=names, features=features)
