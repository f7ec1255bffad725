"""The feature folders other tools write, read and written here:

- TRIDENT's job folder: `<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/<slide>.h5` holding
  `features` (n x d) and `coords` (n x 2, level-0 x, y), the scale as attributes of `coords`
  (`patch_size` at the target magnification, `patch_size_level0`, `level0_magnification`,
  `target_magnification`, `overlap`, `level0_width`, `level0_height`), the same attributes on
  `patches/<slide>_patches.h5`;
- CLAM's: `h5_files/<slide>.h5` with `features` and `coords` and no attributes; the scale is
  on `patches/<slide>.h5` (`patch_size` and `downsample` at `patch_level`), beside the
  features folder or in its parent.

`<slide>` is the slide's file name without its extension, as both tools name it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from histosearch.errors import HistosearchError
from histosearch.fileio import atomic_path

# Extensions TRIDENT cuts whole from a slide's file name to name it.
COMPOUND_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.zarr")
# Target magnifications within this share of each other are the same (CLAM's come from mpp).
SCALE_TOLERANCE = 0.02


class FeatureFolderError(HistosearchError):
    """A features folder or file that cannot be imported as given."""


@dataclass(frozen=True)
class Scale:
    """The grid a feature file was cut on: `patch_size` pixels at `magnification`, one patch
    being `tile_l0` level-0 pixels of a slide scanned at `level0_magnification`."""

    magnification: float
    patch_size: int
    tile_l0: float
    level0_magnification: float

    def matches(self, magnification: float, patch_size: int) -> bool:
        return patch_size == self.patch_size and math.isclose(
            magnification, self.magnification, rel_tol=SCALE_TOLERANCE
        )

    def __str__(self) -> str:
        return f"{self.magnification:g}x, {self.patch_size} px"


@dataclass(frozen=True)
class FeatureFile:
    """One slide's features in a TRIDENT or CLAM folder, and the patches file beside it."""

    name: str
    path: Path
    layout: str
    patches: Path | None


@dataclass(frozen=True)
class ForeignFeatures:
    """A feature file's contents: features (float32), level-0 coordinates (int64), and the
    attributes of its coordinates (its own, completed by its patches file's)."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, object]

    def scale(self, level0_magnification: float | None = None) -> Scale | None:
        """The grid's scale from the attributes; `level0_magnification` (from a slide list's
        mpp or the slide file) completes CLAM's, which do not record it. None if unknown."""
        size = _number(self.attrs.get("patch_size"))
        if not size:
            return None
        target = _number(self.attrs.get("target_magnification"))
        level0 = _number(self.attrs.get("level0_magnification"))
        size_l0 = _number(self.attrs.get("patch_size_level0"))
        downsample = _number(self.attrs.get("downsample"))
        if target and (level0 or size_l0):  # TRIDENT's
            tile_l0 = size * level0 / target if level0 else size_l0
            return Scale(target, int(size), tile_l0, level0 or target * size_l0 / size)
        if downsample and level0_magnification:  # CLAM's
            magnification = round(level0_magnification / downsample, 2)
            return Scale(magnification, int(size), size * downsample, level0_magnification)
        return None

    def level0_size(self) -> tuple[int, int] | None:
        """The slide's level-0 (width, height) as the attributes record it, if they do."""
        width, height = (_number(self.attrs.get(k)) for k in ("level0_width", "level0_height"))
        if width and height:
            return int(width), int(height)
        level_dim = _numbers(self.attrs.get("level_dim"))
        downsample = _number(self.attrs.get("downsample"))
        if level_dim is not None and len(level_dim) == 2 and downsample:
            return int(level_dim[0] * downsample), int(level_dim[1] * downsample)
        return None


def _numbers(value: object) -> np.ndarray | None:
    if isinstance(value, bytes):
        value = value.decode()
    if value is None or isinstance(value, str):  # TRIDENT writes None as "None"
        return None
    try:
        numbers = np.atleast_1d(np.asarray(value, np.float64))
    except (TypeError, ValueError):
        return None
    return numbers if numbers.size and np.isfinite(numbers).all() else None


def _number(value: object) -> float | None:
    """A positive number from an attribute (the first of a pair such as CLAM's downsample)."""
    numbers = _numbers(value)
    return float(numbers[0]) if numbers is not None and numbers[0] > 0 else None


def slide_name(path: str | Path) -> str:
    """A slide's name in TRIDENT and CLAM: its file name without the extension (both parts
    of an `.ome.tif`'s, as TRIDENT cuts it)."""
    name = Path(path).name
    compound = next((s for s in COMPOUND_SUFFIXES if name.lower().endswith(s)), None)
    return name[: -len(compound)] if compound else Path(name).stem


def _features_folders(folder: Path) -> list[Path]:
    """TRIDENT's `features_<encoder>` folders: `folder` itself, in it, or one level down."""
    if folder.name.startswith("features_"):
        return [folder]
    found = sorted(p for p in folder.glob("features_*") if p.is_dir())
    return found or sorted(p for p in folder.glob("*/features_*") if p.is_dir())


def find_feature_files(folder: Path) -> list[FeatureFile]:
    """The feature files of a TRIDENT job folder (or one of its `<mag>x_...` or
    `features_<encoder>` folders) or a CLAM features folder (or its `h5_files`); refused when
    there are none, or several encoders' or magnifications' features to choose from."""
    if not folder.is_dir():
        raise FeatureFolderError(folder, "no such features folder")
    if (folder / "h5_files").is_dir() or folder.name == "h5_files":
        h5_dir = folder if folder.name == "h5_files" else folder / "h5_files"
        layout, files = "clam", sorted(h5_dir.glob("*.h5"))
        roots = (h5_dir.parent, h5_dir.parent.parent)

        def patches(name: str) -> Path | None:
            return next((p for r in roots if (p := r / "patches" / f"{name}.h5").is_file()), None)

    else:
        folders = _features_folders(folder)
        if len(folders) > 1:
            shown = ", ".join(str(p.relative_to(folder)) for p in folders)
            raise FeatureFolderError(
                folder,
                f"features of several encoders or magnifications ({shown}): give one of them",
            )
        if not folders:
            raise FeatureFolderError(
                folder,
                "neither a TRIDENT job folder (<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/)"
                " nor a CLAM features folder (h5_files/)",
            )
        layout, files = "trident", sorted(folders[0].glob("*.h5"))

        def patches(name: str) -> Path | None:
            path = folders[0].parent / "patches" / f"{name}_patches.h5"
            return path if path.is_file() else None

    if not files:
        raise FeatureFolderError(folder, f"no .h5 feature files in this {layout} folder")
    return [FeatureFile(f.stem, f, layout, patches(f.stem)) for f in files]


def _attrs(dataset: h5py.Dataset) -> dict[str, object]:
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in dataset.attrs.items()}


def read_foreign(file: FeatureFile) -> ForeignFeatures:
    """A feature file's features, coordinates and their attributes; one that is unreadable,
    lacks `features` or `coords`, or holds arrays of the wrong shapes is refused."""
    try:
        with h5py.File(file.path, "r") as h5:
            missing = [k for k in ("features", "coords") if k not in h5]
            if missing:
                raise FeatureFolderError(file.path, f"no {' or '.join(missing)} dataset")
            features = np.asarray(h5["features"][:], np.float32)
            coords = np.asarray(h5["coords"][:])
            attrs = _attrs(h5["coords"])
        if file.patches is not None:
            with h5py.File(file.patches, "r") as h5:
                attrs = {**_attrs(h5["coords"]), **attrs}
    except (OSError, KeyError) as error:
        raise FeatureFolderError(file.path, f"unreadable ({error})") from None
    if not len(coords):  # TRIDENT writes such a file for a slide without tissue
        raise FeatureFolderError(file.path, "holds no patches")
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFolderError(
            file.path,
            f"features {features.shape} and coords {coords.shape}: not n x d and n x 2",
        )
    if len(features) != len(coords):
        raise FeatureFolderError(
            file.path, f"{len(features)} feature rows but {len(coords)} coordinates"
        )
    if not np.isfinite(features).all():
        raise FeatureFolderError(file.path, "features hold NaN or infinite values")
    return ForeignFeatures(features, np.rint(coords).astype(np.int64), attrs)


def write_trident(
    folder: Path,
    name: str,
    features: np.ndarray,
    coords: np.ndarray,
    scale: Scale,
    *,
    encoder: str,
    level0_size: tuple[int, int] | None = None,
) -> Path:
    """Write one slide as TRIDENT does in the job folder `folder`: its features file in
    `<mag>x_<ps>px_0px_overlap/features_<encoder>/` and its coordinates file in `patches/`,
    each renamed into place; returns the features file."""
    grid = folder / trident_grid(scale)
    coords = np.asarray(coords, np.int64)
    attrs: dict[str, object] = {
        "patch_size": scale.patch_size,
        "patch_size_level0": round(scale.tile_l0),
        "level0_magnification": scale.level0_magnification,
        "target_magnification": scale.magnification,
        "overlap": 0,
        "name": name,
        "savetodir": str(grid),
    }
    if level0_size is not None:
        attrs["level0_width"], attrs["level0_height"] = level0_size
    target = grid / f"features_{encoder}" / f"{name}.h5"
    patches = grid / "patches" / f"{name}_patches.h5"
    for path, datasets in (
        (patches, {"coords": coords}),
        (target, {"features": np.asarray(features, np.float32), "coords": coords}),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            for key, data in datasets.items():
                h5.create_dataset(key, data=data)
            h5["coords"].attrs.update(attrs)
            if "features" in h5:
                h5["features"].attrs.update(
                    {"name": name, "savetodir": str(target.parent), "encoder": encoder}
                )
    return target


def trident_grid(scale: Scale) -> str:
    """TRIDENT's name of a grid's folder, `<mag>x_<ps>px_0px_overlap`."""
    return f"{scale.magnification:g}x_{scale.patch_size}px_0px_overlap"
