"""A short, stable identity of an encoder's weights: sha256 of the files, cached by
(path, size, mtime) so a multi-GB checkpoint is hashed once per machine."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from histosearch.encoders.catalog import user_cache_dir
from histosearch.fileio import atomic_path

FINGERPRINT_DIGITS = 16
CHUNK = 1 << 24


def fingerprint_cache() -> Path:
    return user_cache_dir() / "fingerprints.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(files: Sequence[Path]) -> str:
    """First 16 hex digits of the sha256 of the files' digests (one file: of that file)."""
    cache_path = fingerprint_cache()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, changed = [], False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = file_sha256(path), True
        digests.append(cache[key])
    if changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_path) as tmp:
                tmp.write_text(json.dumps(cache, indent=0))
        except OSError:  # a read-only home only costs hashing again next time
            pass
    if len(digests) == 1:
        return digests[0][:FINGERPRINT_DIGITS]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:FINGERPRINT_DIGITS]
