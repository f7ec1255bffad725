"""CRC-32 checksums of what an answer depends on: a slide's store rows and feature file
datasets, and the files derived from the store. CRC-32 detects every burst of up to 32 flipped
bits, so any changed byte, and zlib computes it at memory speed.

Each checksum is recorded in the catalog when its bytes are written and compared when they are
read for an answer (`check`, reindexing, and a search's final rows).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from histosearch.archive.catalog import ArchiveError


def array_checksum(*arrays: np.ndarray, start: int = 0) -> int:
    """The CRC-32 of the arrays' bytes, one after the other (in their stored dtypes)."""
    crc = start
    for array in arrays:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"), crc)
    return crc


def text_checksum(texts: list[str], start: int = 0) -> int:
    """The CRC-32 of strings, each ended by a NUL byte."""
    return zlib.crc32("".join(f"{t}\0" for t in texts).encode(), start)


def file_checksum(file: BinaryIO, chunk: int = 1 << 24) -> int:
    """The CRC-32 of an open file's bytes from its start, read a chunk at a time."""
    file.seek(0)
    crc = 0
    while data := file.read(chunk):
        crc = zlib.crc32(data, crc)
    return crc


def write_checksummed(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Write the file at `path` by `write(file)` and return the CRC-32 of the bytes that
    reached it, read back (writers such as zipfile seek back to fill in their headers, so
    the bytes are not checksummed as they are written, and none are held in memory)."""
    with path.open("w+b") as file:
        write(file)
        file.flush()
        return file_checksum(file)


def mismatch(path: Path | str, what: str) -> ArchiveError:
    """The error for bytes that differ from their recorded checksum."""
    return ArchiveError(
        path,
        f"{what} differ from the checksum recorded when they were written (damaged on disk "
        "or changed by hand); run histosearch check --archive DIR --repair",
    )
