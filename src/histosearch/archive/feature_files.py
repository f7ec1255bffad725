"""The per-slide feature files, `features/<name>-<hash>.h5`: `features` (n x d, float16) and
`coords` (n x 2, level-0 x, y), the layout CLAM and TRIDENT write, plus `paths` for patch
groups, and as attributes the slide's metadata, the archive's settings (enough to rebuild the
catalog) and `checksum`, the CRC-32 of the datasets (`features`, `coords`, then `paths`). The
interchange copy of an archive's full features.

The catalog records the CRC-32 of each whole file, and a file read for its features is checked
against it before HDF5 parses a byte: a damaged HDF5 header or heap can make the library loop
or allocate without end, so damage must be found before it is parsed."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histosearch.archive.catalog import ArchiveError
from histosearch.archive.checksums import array_checksum, mismatch, text_checksum
from histosearch.fileio import atomic_path

# The attribute holding the slide's metadata beyond the built-in columns, as a JSON object.
METADATA_ATTR = "metadata"


def metadata_attr(metadata: Mapping[str, str]) -> str:
    """Metadata as the feature file's attribute holds it."""
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False)


def attr_metadata(attrs: Mapping[str, object]) -> dict[str, str]:
    """The metadata a feature file's attributes hold (none in files from before metadata)."""
    return {str(k): str(v) for k, v in json.loads(str(attrs.get(METADATA_ATTR) or "{}")).items()}


def write_feature_metadata(
    path: Path, metadata: Mapping[str, str], expected_crc: int | None
) -> int:
    """Replace a feature file's metadata: a copy with the new attribute, renamed over it. The
    file must hold the bytes the catalog recorded (`expected_crc`); returns the new file's
    checksum."""
    data = _read_verified(path, path.stem, expected_crc)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            with h5py.File(tmp, "a") as h5:
                h5.attrs[METADATA_ATTR] = metadata_attr(metadata)
            crc = zlib.crc32(tmp.read_bytes())
    except OSError as error:  # a lost file, disk full, read-only folder
        raise ArchiveError(path, f"cannot write the feature file's metadata: {error}") from None
    return crc


# What h5py raises for a missing, truncated or scrambled file (its B-tree errors surface as
# RuntimeError, an undecodable attribute as ValueError).
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's stored full patch embeddings and where they came from: `slide` is the
    catalog key the file says it belongs to, `checksum` the CRC-32 of its datasets as read
    (None when the features were not read)."""

    features: np.ndarray
    coords: np.ndarray
    paths: list[str] | None
    slide: str | None = None
    checksum: int | None = None


def datasets_checksum(features: np.ndarray, coords: np.ndarray, paths: list[str] | None) -> int:
    """The CRC-32 of a feature file's datasets as stored (float16 features, int64 coords)."""
    crc = array_checksum(np.asarray(features, np.float16), np.asarray(coords, np.int64))
    return crc if paths is None else text_checksum(paths, crc)


def write_feature_file(
    target: Path,
    features: np.ndarray,
    coords: np.ndarray,
    paths: list[str] | None,
    attrs: Mapping[str, object],
) -> int:
    """Write a slide's feature file under a temporary name, then rename it into place;
    returns the whole file's checksum (the datasets' is stored as the `checksum` attribute)."""
    try:
        with atomic_path(target) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("features", data=np.asarray(features, np.float16))
                h5.create_dataset("coords", data=np.asarray(coords, np.int64))
                if paths is not None:
                    h5.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
                h5.attrs.update({k: v for k, v in attrs.items() if v is not None})
                h5.attrs["checksum"] = datasets_checksum(features, coords, paths)
            return zlib.crc32(tmp.read_bytes())
    except OSError as error:  # disk full, read-only folder
        raise ArchiveError(target, f"cannot write the feature file: {error}") from None


def file_checksum(path: Path) -> int:
    """The CRC-32 of a whole file, as the catalog records it for a feature file."""
    return zlib.crc32(path.read_bytes())


def _read_verified(path: Path, name: str, expected_crc: int | None) -> bytes:
    """A feature file's bytes, refused unless their CRC-32 is `expected_crc` (None: not
    recorded, in archives from before checksums)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        reason = "missing" if not path.exists() else f"unreadable ({error.strerror})"
        raise ArchiveError(
            path, f"feature file of {name} is {reason}; run histosearch check"
        ) from None
    if expected_crc is not None and zlib.crc32(data) != expected_crc:
        raise mismatch(path, f"the bytes of the feature file of {name}")
    return data


def read_feature_file(
    path: Path, name: str, with_features: bool = True, expected_crc: int | None = None
) -> SlideFeatures:
    """A feature file's features (float32; empty unless `with_features`), coordinates, patch
    paths, the slide it says it holds and (with the features) its datasets' checksum. With the
    features, the whole file is read and checked against `expected_crc` first. A missing,
    unreadable or changed file is an ArchiveError naming slide `name`."""
    source = io.BytesIO(_read_verified(path, name, expected_crc)) if with_features else path
    try:
        with h5py.File(source, "r") as h5:
            _check_sizes(path, h5)
            paths = [p.decode() for p in h5["paths"][:]] if "paths" in h5 else None
            stored = h5["features"][:] if with_features else None
            coords = h5["coords"][:]
            slide = h5.attrs.get("slide")
    except H5_ERRORS as error:
        reason = "missing" if not path.exists() else f"unreadable ({error})"
        raise ArchiveError(
            path, f"feature file of {name} is {reason}; run histosearch check"
        ) from None
    if stored is None:
        return SlideFeatures(np.empty((0, 0), np.float32), coords, paths, slide)
    checksum = datasets_checksum(stored, coords, paths)
    return SlideFeatures(stored.astype(np.float32), coords, paths, slide, checksum)


def _check_sizes(path: Path, h5: h5py.File) -> None:
    """Refuse datasets that claim more bytes than the file holds (a damaged header would
    otherwise make h5py allocate and read them)."""
    size = path.stat().st_size
    for name in ("features", "coords", "paths"):
        if name in h5 and h5[name].size * h5[name].dtype.itemsize > size:
            raise OSError(f"its {name} dataset claims more bytes than the file holds")


def read_feature_attrs(path: Path) -> tuple[dict[str, object], int] | None:
    """A feature file's attributes and patch count; None when it cannot be read."""
    try:
        with h5py.File(path, "r") as h5:
            _check_sizes(path, h5)
            attrs = {k: v.item() if hasattr(v, "item") else v for k, v in h5.attrs.items()}
            return attrs, len(h5["coords"])
    except H5_ERRORS:
        return None
