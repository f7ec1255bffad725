"""Embeddings an `eval` keeps in its output folder, one file per encoder, reused by the next
run into the same folder while the encoder's weights and every image are unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosearch.fileio import atomic_path

EMBEDDINGS = "embeddings"


def embedding_key(encoder_name: str, fingerprint: str) -> str:
    """What a set's embeddings depend on besides the images: the encoder and its weights."""
    return f"{encoder_name}|{fingerprint}"


def files_signature(paths: Sequence[Path]) -> np.ndarray:
    """Each image as `path:size:mtime_ns`: an image rewritten in place gets a new entry."""
    rows = []
    for path in paths:
        stat = Path(path).stat()
        rows.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return np.array(rows)


def cache_file(out: Path, key: str) -> Path:
    """Where the embeddings of one encoder are kept under `out`."""
    name = key.split("|", 1)[0]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name)
    return out / EMBEDDINGS / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def cached_embeddings(out: Path, key: str, paths: Sequence[Path]) -> np.ndarray | None:
    """The embeddings an earlier `eval` into `out` saved for the same encoder, weights and
    images (same paths, sizes and modification times)."""
    path = cache_file(out, key)
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            if str(stored["key"]) == key and np.array_equal(
                stored["files"], files_signature(paths)
            ):
                return stored["features"]
    except Exception:  # an unreadable cache is only a cache: embed again
        return None
    return None


def save_embeddings(out: Path, key: str, paths: Sequence[Path], features: np.ndarray) -> Path:
    """Keep a set's embeddings in `out`, for the next `eval` into it."""
    path = cache_file(out, key)
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        np.savez(file, key=np.array(key), files=files_signature(paths), features=features)
    return path
