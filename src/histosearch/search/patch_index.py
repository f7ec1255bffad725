"""An approximate (or exact) FAISS index over the archive's reduced patch vectors.

Row ids are the store's row numbers in order: the index holds rows 0..ntotal-1 and `add`
appends the next ones, so a hit's row is directly a row of the store. The index type is chosen
by archive size (`choose_factory`): an exact flat index for small archives, an inverted file
(IVF) with flat lists in the middle and product-quantised lists (IVF-PQ, 1/8 of the float32
bytes) for large ones. The coarse quantiser and codebooks are trained once, on a sample, and
frozen: adding slides later never retrains, so earlier results do not shift.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from histosearch.fileio import atomic_path, gather_rows, release_pages
from histosearch.search.similarity import l2_normalize

METRICS = ("cosine", "l2")
# Vectors are converted (float16 -> normalised float32) and added this many rows at a time,
# so a memory-mapped store is never materialised in float32 as a whole.
ADD_CHUNK = 1 << 18
# Below FLAT_BELOW rows an exact scan is as fast as a probe; from PQ_FROM rows on, IVF-Flat's
# float32 lists (512 B per 128-d row) cost more memory than the 8 GB budget of 10^7 patches
# allows. Measured on the 2-core machine with `histosearch bench scale` (see the README).
FLAT_BELOW = 200_000
PQ_FROM = 2_000_000
# From HNSW_FROM rows on, the coarse quantiser is an HNSW graph over more, shorter lists:
# assigning 10^8 vectors to 8,192 lists by a flat scan costs 2 * 10^14 flops; the graph visits a
# few hundred centroids per vector.
HNSW_FROM = 20_000_000
MAX_NLIST, MAX_NLIST_HNSW = 2048, 8192
# Training points per IVF list: FAISS wants at least 39; more buys little and costs k-means time.
TRAIN_PER_LIST = 48
# Lists probed per query: recall of the voting stage against the probe's cost (README).
DEFAULT_NPROBE = 8
# Searches of fewer query vectors than this run on one thread: OpenMP's fork and join cost
# more than they save there, five times over on a busy machine (measured: one patch query
# over 10^5 patches, 24 ms on one thread against 118 ms on two with the cores shared).
THREADED_FROM = 32


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run FAISS on `n` OpenMP threads inside the block."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def choose_factory(n: int, dim: int) -> str:
    """The `faiss.index_factory` string for an archive of `n` vectors of `dim` dimensions."""
    if n < FLAT_BELOW:
        return "Flat"
    # about 2 sqrt(n) lists, a power of two, at most MAX_NLIST (beyond, assigning 10^7 vectors
    # to the lists by a flat scan costs more build time than the shorter lists save at query
    # time) or, with the graph quantiser, about sqrt(n) and at most MAX_NLIST_HNSW
    if n < HNSW_FROM:
        nlist, quantiser = int(np.clip(2 ** round(np.log2(2 * np.sqrt(n))), 256, MAX_NLIST)), ""
    else:
        nlist, quantiser = int(min(2 ** round(np.log2(np.sqrt(n))), MAX_NLIST_HNSW)), "_HNSW32"
    if n < PQ_FROM:
        return f"IVF{nlist},Flat"
    m = next(m for m in (dim // 4, dim // 2, dim) if dim % m == 0)
    return f"IVF{nlist}{quantiser},PQ{m}"


def _prepared(vectors: np.ndarray, metric: str) -> np.ndarray:
    """A block as the index holds it: float32, and L2-normalised for the cosine metric."""
    if metric == "cosine":
        return l2_normalize(vectors)
    return np.ascontiguousarray(vectors, dtype=np.float32)


class PatchIndex:
    """A FAISS index over patch vectors whose ids are the store's row numbers."""

    def __init__(self, index: faiss.Index, metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        self.index, self.metric = index, metric

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        metric: str = "cosine",
        kind: str = "auto",
        *,
        nprobe: int = DEFAULT_NPROBE,
        seed: int = 0,
    ) -> PatchIndex:
        """Train (on a sample, when the type needs training) and fill an index with `vectors`
        (any float dtype, a memory map included); `kind` is a factory string or `auto`."""
        index = cls.trained(vectors, len(vectors), metric, kind, nprobe=nprobe, seed=seed)
        index.add(vectors)
        return index

    @classmethod
    def trained(
        cls,
        sample: np.ndarray,
        n: int,
        metric: str = "cosine",
        kind: str = "auto",
        *,
        nprobe: int = DEFAULT_NPROBE,
        seed: int = 0,
    ) -> PatchIndex:
        """An empty index of the type for `n` vectors, trained (when the type needs it) on
        rows of `sample` (all of them, or as many as the type wants, drawn at random)."""
        dim = sample.shape[1]
        factory = choose_factory(n, dim) if kind == "auto" else kind
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        index = faiss.index_factory(dim, factory, faiss_metric)
        patch_index = cls(index, metric)
        if not index.is_trained:
            ivf = faiss.extract_index_ivf(index)
            size = min(len(sample), TRAIN_PER_LIST * ivf.nlist)
            rows = np.sort(np.random.default_rng(seed).choice(len(sample), size, replace=False))
            index.train(_prepared(gather_rows(sample, rows, ADD_CHUNK), metric))
        patch_index.nprobe = nprobe
        return patch_index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query (None for an exact index)."""
        try:
            return int(faiss.extract_index_ivf(self.index).nprobe)
        except RuntimeError:
            return None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        with contextlib.suppress(RuntimeError):  # not an IVF index: nothing to probe
            faiss.extract_index_ivf(self.index).nprobe = int(value)

    def add(self, vectors: np.ndarray) -> None:
        """Append `vectors` as the next rows, without retraining."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {vectors.shape}")
        for start in range(0, len(vectors), ADD_CHUNK):
            chunk = vectors[start : start + ADD_CHUNK]
            self.index.add(_prepared(chunk, self.metric))
            release_pages(chunk)  # a store larger than memory is read once, not held

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (n_queries, k), best first; missing hits have row -1 and
        similarity 0. Cosine is clipped to [0, 1]; for L2 the similarity is 1 / (1 + distance).
        `allowed` (a boolean per row) restricts the search to those rows, inside FAISS, so
        that excluded slides do not use up the k hits; an IVF index then probes `nprobe`
        divided by the allowed share of its lists (at most all)."""
        k = min(k, self.ntotal)
        params = None
        if allowed is not None:
            if len(allowed) != self.ntotal:
                raise ValueError(f"allowed has {len(allowed)} rows, the index {self.ntotal}")
            bitmap = np.packbits(allowed, bitorder="little")  # FAISS reads bit i of byte i // 8
            selector = faiss.IDSelectorBitmap(self.ntotal, faiss.swig_ptr(bitmap))
            nprobe = self.nprobe
            if nprobe is not None:
                # probe as many more lists as the restriction leaves fewer rows in each, so
                # that as many allowed rows are scanned as a search of every row scans
                share = max(int(np.count_nonzero(allowed)), 1) / self.ntotal
                nlist = faiss.extract_index_ivf(self.index).nlist
                nprobe = min(nlist, max(nprobe, round(nprobe / share)))
            params = (
                faiss.SearchParameters(sel=selector)
                if nprobe is None
                else faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            )
        threads = 1 if len(queries) < THREADED_FROM else faiss.omp_get_max_threads()
        with faiss_threads(threads):
            scores, rows = self.index.search(_prepared(queries, self.metric), k, params=params)
        if self.metric == "l2":
            # FAISS returns squared distances (approximate, hence possibly slightly negative)
            sims = 1 / (1 + np.sqrt(np.maximum(scores, 0)))
        else:
            sims = np.clip(scores, 0, 1)
        sims[rows < 0] = 0
        return sims.astype(np.float32), rows

    def save(self, path: str | Path) -> None:
        """Write the index atomically; the metric is kept in the FAISS header."""
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    def write(self, file: BinaryIO) -> None:
        """Write the index into an open binary file as `save` writes it, a block at a time
        (no copy of its bytes in memory)."""
        faiss.write_index(self.index, faiss.PyCallbackIOWriter(file.write))

    @classmethod
    def load(cls, path: str | Path) -> PatchIndex:
        return cls._of(faiss.read_index(str(path)))

    @classmethod
    def read(cls, file: BinaryIO) -> PatchIndex:
        """An index from an open binary file holding a saved one, read a block at a time."""
        return cls._of(faiss.read_index(faiss.PyCallbackIOReader(file.read)))

    @classmethod
    def _of(cls, index: faiss.Index) -> PatchIndex:
        metric = "cosine" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
        return cls(index, metric)
