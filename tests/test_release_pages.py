"""`fileio.release_pages`: a pass over a memory-mapped store does not keep it resident."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histosearch.fileio import release_pages


def _resident_file_mb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("RssFile:")) / 1024


def test_released_pages_leave_the_process_and_read_back_the_same(tmp_path: Path):
    values = np.arange(16 << 20, dtype=np.float32)  # 64 MB
    values.tofile(tmp_path / "store.f32")
    store = np.memmap(tmp_path / "store.f32", np.float32, "r")
    before = _resident_file_mb()
    total = float(store.sum(dtype=np.float64))  # maps every page
    mapped = _resident_file_mb()
    release_pages(store)
    assert mapped - before > 48 and mapped - _resident_file_mb() > 48
    assert float(store.sum(dtype=np.float64)) == total  # read again from the page cache


def test_arrays_in_memory_and_writable_maps_are_left_alone(tmp_path: Path):
    values = np.arange(1 << 20, dtype=np.float32)
    release_pages(values)
    np.save(tmp_path / "v.npy", values)
    writable = np.load(tmp_path / "v.npy", mmap_mode="r+")
    writable[:10] = -1  # not yet written back: dropping its pages would lose this
    release_pages(writable)
    assert values[-1] == (1 << 20) - 1 and writable[0] == -1
