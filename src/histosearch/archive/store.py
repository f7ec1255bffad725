"""The search store: every stored patch's searchable (reduced) vector as float16 and its level-0
tile position as int32, in two raw append-only files that searches memory-map.

Rows past the catalog's last committed slide (an interrupted add) are ignored by readers and
cut off by the next writer. A rebuild (`reindex`) writes a new generation beside the old one;
the catalog's `generation` setting says which one is current.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histosearch.archive.catalog import ArchiveError
from histosearch.archive.checksums import array_checksum

STORE = "store"


class VectorStore:
    """One generation of the store of an archive at `root`, with `dim`-d vectors."""

    def __init__(self, root: Path, generation: int, dim: int) -> None:
        folder = root / STORE
        self.vectors_path = folder / f"vectors-{generation}.f16"
        self.coords_path = folder / f"coords-{generation}.i32"
        self.dim = dim

    def rows_on_disk(self) -> int:
        """Rows fully present in both files (committed or not)."""
        if not self.vectors_path.is_file() or not self.coords_path.is_file():
            return 0
        return min(
            self.vectors_path.stat().st_size // (2 * self.dim),
            self.coords_path.stat().st_size // 8,
        )

    def open(self, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Read-only maps of the first `n_rows` vectors (n, dim) and coordinates (n, 2)."""
        if n_rows == 0:
            return np.empty((0, self.dim), np.float16), np.empty((0, 2), np.int32)
        found = self.rows_on_disk()
        if found < n_rows:
            missing = self.vectors_path if self.vectors_path.is_file() else self.coords_path
            raise ArchiveError(
                missing,
                f"the search store holds {found} rows but the catalog has {n_rows}; "
                "run histosearch check --repair (or histosearch reindex)",
            )
        vectors = np.memmap(self.vectors_path, np.float16, "r", shape=(n_rows, self.dim))
        coords = np.memmap(self.coords_path, np.int32, "r", shape=(n_rows, 2))
        return vectors, coords

    def append(self, start: int, vectors: np.ndarray, coords: np.ndarray) -> int:
        """Write one slide's rows from `start` on, dropping whatever lay past `start` (an
        uncommitted tail), and flush them to disk before the caller commits the catalog rows
        that refer to them; returns their checksum (`rows_checksum`)."""
        if len(vectors) != len(coords):
            raise ValueError("one coordinate pair per vector")
        vectors, coords = np.asarray(vectors, np.float16), np.asarray(coords, np.int32)
        self.vectors_path.parent.mkdir(parents=True, exist_ok=True)
        for path, data, row_bytes in (
            (self.vectors_path, vectors, 2 * self.dim),
            (self.coords_path, coords, 8),
        ):
            with path.open("ab") as file:
                file.truncate(start * row_bytes)
                file.write(np.ascontiguousarray(data).tobytes())
                file.flush()
                os.fsync(file.fileno())
        return rows_checksum(vectors, coords)

    def remove(self) -> None:
        self.vectors_path.unlink(missing_ok=True)
        self.coords_path.unlink(missing_ok=True)


def rows_checksum(vectors: np.ndarray, coords: np.ndarray) -> int:
    """The CRC-32 of a slide's store rows as stored: float16 vectors, then int32 coordinates."""
    return array_checksum(np.asarray(vectors, np.float16), np.asarray(coords, np.int32))
