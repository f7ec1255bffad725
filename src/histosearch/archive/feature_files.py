"""The per-slide feature files, `features/<name>-<hash>.h5`: `features` (n x d, float16) and
`coords` (n x 2, level-0 x, y), the layout CLAM and TRIDENT write, plus `paths` for patch
groups, and as attributes the slide's metadata and the archive's settings (enough to rebuild
the catalog). The interchange copy of an archive's full features."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histosearch.archive.catalog import ArchiveError
from histosearch.fileio import atomic_path

# The attribute holding the slide's metadata beyond the built-in columns, as a JSON object.
METADATA_ATTR = "metadata"


def metadata_attr(metadata: Mapping[str, str]) -> str:
    """Metadata as the feature file's attribute holds it."""
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False)


def attr_metadata(attrs: Mapping[str, object]) -> dict[str, str]:
    """The metadata a feature file's attributes hold (none in files from before metadata)."""
    return {str(k): str(v) for k, v in json.loads(str(attrs.get(METADATA_ATTR) or "{}")).items()}


def write_feature_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Replace a feature file's metadata: a copy with the new attribute, renamed over it."""
    try:
        with atomic_path(path) as tmp:
            shutil.copyfile(path, tmp)
            with h5py.File(tmp, "a") as h5:
                h5.attrs[METADATA_ATTR] = metadata_attr(metadata)
    except OSError as error:  # a lost file, disk full, read-only folder
        raise ArchiveError(path, f"cannot write the feature file's metadata: {error}") from None


# What h5py raises for a missing, truncated or scrambled file (its B-tree errors surface as
# RuntimeError, an undecodable attribute as ValueError).
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError)


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's stored full patch embeddings and where they came from."""

    features: np.ndarray
    coords: np.ndarray
    paths: list[str] | None


def write_feature_file(
    target: Path,
    features: np.ndarray,
    coords: np.ndarray,
    paths: list[str] | None,
    attrs: Mapping[str, object],
) -> None:
    """Write a slide's feature file under a temporary name, then rename it into place."""
    try:
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=np.asarray(features, np.float16))
            h5.create_dataset("coords", data=np.asarray(coords, np.int64))
            if paths is not None:
                h5.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
            h5.attrs.update({k: v for k, v in attrs.items() if v is not None})
    except OSError as error:  # disk full, read-only folder
        raise ArchiveError(target, f"cannot write the feature file: {error}") from None


def read_feature_file(path: Path, name: str, with_features: bool = True) -> SlideFeatures:
    """A feature file's features (float32; empty unless `with_features`), coordinates and
    patch paths; a missing or unreadable file is an ArchiveError naming slide `name`."""
    try:
        with h5py.File(path, "r") as h5:
            paths = [p.decode() for p in h5["paths"][:]] if "paths" in h5 else None
            features = h5["features"][:].astype(np.float32) if with_features else np.empty((0, 0))
            coords = h5["coords"][:]
    except (OSError, KeyError) as error:
        reason = "missing" if not path.exists() else f"unreadable ({error})"
        raise ArchiveError(
            path, f"feature file of {name} is {reason}; run histosearch check"
        ) from None
    return SlideFeatures(features, coords, paths)


def read_feature_attrs(path: Path) -> tuple[dict[str, object], int] | None:
    """A feature file's attributes and patch count; None when it cannot be read."""
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: v.item() if hasattr(v, "item") else v for k, v in h5.attrs.items()}
            return attrs, len(h5["coords"])
    except (OSError, KeyError):
        return None
