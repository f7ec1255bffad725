"""Writing files so that a crash never leaves a half-written one behind, and reading memory-mapped
files larger than memory without holding them resident."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`, renamed onto `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; a result should read like any file
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_WILLNEED, _MADV_DONTNEED = 3, 4  # Linux


def _advise(array: object, advice: int, whole: bool) -> None:
    """madvise the pages under a read-only `np.memmap`'s slice (only the pages wholly inside
    it when `whole`); anything else, and other systems, are left alone."""
    import ctypes
    import sys

    import numpy as np

    if not (isinstance(array, np.memmap) and array.mode == "r" and sys.platform == "linux"):
        return
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    first = -(-start // _PAGE) * _PAGE if whole else start // _PAGE * _PAGE
    last = end // _PAGE * _PAGE if whole else -(-end // _PAGE) * _PAGE
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)


def release_pages(array: object) -> None:
    """Unmap the whole pages under a read-only memory map's slice from this process.

    A pass over a memory-mapped file larger than memory would otherwise count every page it
    read in the process's resident size; the pages stay in the page cache (nothing is lost),
    only the mapping is dropped, and a later read maps them again. Anything but a read-only
    `np.memmap` (where dropping pages would lose data) is left alone, as are other systems.
    Whole pages only: their neighbours may still be in use.
    """
    _advise(array, _MADV_DONTNEED, whole=True)


def prefetch_pages(array: object) -> None:
    """Have the kernel read the pages under a read-only memory map's slice now, in the
    background: the reads of many scattered slices of a file not in the page cache then
    overlap rather than fault in one after another. Anything else is left alone."""
    _advise(array, _MADV_WILLNEED, whole=False)


def gather_rows(array: np.ndarray, rows: np.ndarray, run: int) -> np.ndarray:
    """`array[rows]` for ascending `rows`, read `run` rows of `array` at a time: a read-only
    memory map's pages are released after each run (`release_pages`), so rows gathered from
    all over a file larger than memory do not leave the whole file counted as resident."""
    import numpy as np

    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    bounds = np.searchsorted(rows, np.arange(0, len(array) + run, run))
    for first, last in itertools.pairwise(bounds.tolist()):
        if last > first:
            out[first:last] = array[rows[first:last]]
            release_pages(array[rows[first] : rows[last - 1] + 1])
    return out
