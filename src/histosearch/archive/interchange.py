"""Features in from and out to the folders TRIDENT and CLAM write (`trident.py`): an archive
built or grown from features already extracted, embedding nothing, and an archive's features
written as TRIDENT writes them, for a MIL or slide-encoder pipeline.

The encoder named must be one histosearch can build, of the features' dimension, so that a
query by file is embedded the same way; the catalog records that its features were imported
(`imported`: the layouts) and, as for any archive, the weights' fingerprint."""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histosearch.archive.adding import IndexReport
from histosearch.archive.catalog import CATALOG
from histosearch.archive.folder import ArchiveFolder
from histosearch.archive.metadata import BUILTIN_COLUMNS
from histosearch.archive.settings import ArchiveSettings
from histosearch.archive.trident import (
    FeatureFile,
    FeatureFolderError,
    ForeignFeatures,
    Scale,
    find_feature_files,
    read_foreign,
    slide_name,
    trident_grid,
    write_trident,
)
from histosearch.archive.upkeep import sync
from histosearch.errors import HistosearchError
from histosearch.fileio import atomic_path
from histosearch.inputs import ManifestError, catalog_key, read_table
from histosearch.slide import magnification_from_mpp, open_slide

if TYPE_CHECKING:
    from histosearch.encoders import Encoder

# The slide list's columns histosearch reads itself (TRIDENT's `wsi,mpp`, and the metadata
# every manifest may carry); any other column is a slide's metadata.
LIST_COLUMNS = ("wsi", "mpp", "label", "patient", "group")
SLIDE_LIST = "slides.csv"
# A slide file or listed mpp this far from the level-0 magnification a feature file records
# is another slide (or a wrong mpp); scanners' and TRIDENT's nominal rounding stay within it.
LEVEL0_TOLERANCE = 0.25
# A new archive's reduction, n_features and index metric unless told (the rest is the files')
DEFAULT_SETTINGS = ArchiveSettings()


@dataclass(frozen=True)
class ListedSlide:
    """A row of a slide list: the slide file (None when it is not there), its resolution and
    metadata."""

    path: Path | None
    mpp: float | None
    label: str | None = None
    patient: str | None = None
    group: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def read_slide_list(table: Path) -> dict[str, ListedSlide]:
    """A slide list (TRIDENT's CSV: `wsi`, the slide's file relative to the list or absolute,
    and `mpp`; optionally `label`, `patient`, `group` and metadata columns) by slide name (the
    file name without its extension, as TRIDENT names its feature files, or as written)."""
    columns, rows = read_table(table, "slide list")
    if "wsi" not in columns:
        raise ManifestError(table, f"no 'wsi' column (columns: {', '.join(columns)})")
    extra = [c for c in columns if c not in LIST_COLUMNS and c not in BUILTIN_COLUMNS]
    listed: dict[str, ListedSlide] = {}
    lines: dict[str, int] = {}
    for number, row in rows:
        if not row["wsi"]:
            raise ManifestError(table, f"line {number}: no wsi")
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = math.nan
            if not mpp > 0 or not math.isfinite(mpp):
                raise ManifestError(table, f"line {number}: mpp {row['mpp']!r} is not positive")
        path = table.parent / row["wsi"]
        slide = ListedSlide(
            path.resolve() if path.is_file() else None,
            mpp,
            row.get("label") or None,
            row.get("patient") or None,
            row.get("group") or None,
            {c: row[c] for c in extra if row[c]},
        )
        for name in dict.fromkeys((slide_name(row["wsi"]), Path(row["wsi"]).name)):
            if name in lines:
                raise ManifestError(
                    table, f"line {number}: slide {name} is listed already (line {lines[name]})"
                )
            listed[name], lines[name] = slide, number
    return listed


@dataclass(frozen=True)
class _Entry:
    """A feature file checked and ready to store."""

    key: str
    name: str
    features: np.ndarray
    coords: np.ndarray
    scale: Scale
    mpp: float | None
    listed: ListedSlide


def _prepare(file: FeatureFile, listed: ListedSlide | None, dim: int) -> _Entry:
    """Read a feature file and check it: its scale known, its dimension the encoder's, its
    coordinates inside the slide (the file's when it is there, else as recorded)."""
    read = read_foreign(file)
    if read.features.shape[1] != dim:
        raise FeatureFolderError(
            file.path,
            f"features of dimension {read.features.shape[1]}; the encoder gives {dim}",
        )
    listed = listed or ListedSlide(None, None)
    level0 = magnification_from_mpp(listed.mpp) if listed.mpp else None
    size, mpp = read.level0_size(), listed.mpp
    if listed.path is not None:
        with open_slide(listed.path, mpp=listed.mpp) as slide:
            size, mpp = slide.dimensions, slide.mpp
            level0 = level0 or slide.objective_power
    scale = read.scale(level0)
    if scale is None:
        raise FeatureFolderError(file.path, _unknown_scale(file, read))
    if level0 and not math.isclose(scale.level0_magnification, level0, rel_tol=LEVEL0_TOLERANCE):
        raise FeatureFolderError(
            file.path,
            f"cut from a {scale.level0_magnification:g}x scan, but its slide is "
            f"{level0:g}x ({listed.path or 'mpp of the list'}): another slide, or the wrong mpp",
        )
    _check_inside(file, read.coords, size)
    if mpp is None:
        mpp = magnification_from_mpp(scale.level0_magnification)
    key = catalog_key(listed.path) if listed.path else f"{file.path.resolve()}::features"
    name = listed.path.name if listed.path else file.name
    return _Entry(key, name, read.features, read.coords, scale, mpp, listed)


def _unknown_scale(file: FeatureFile, read: ForeignFeatures) -> str:
    if "downsample" in read.attrs:
        return (
            "the scale is unknown: CLAM's attributes give no level-0 magnification; list the "
            "slide (--slides LIST.csv, columns wsi,mpp) with its mpp or its file"
        )
    beside = "patches/<name>_patches.h5" if file.layout == "trident" else "patches/<name>.h5"
    return (
        "the scale is unknown: its coords carry no patch_size with target_magnification and "
        f"level0_magnification (or patch_size_level0), and there is no {beside} that does"
    )


def _check_inside(file: FeatureFile, coords: np.ndarray, size: tuple[int, int] | None) -> None:
    outside = (coords < 0).any(axis=1)
    if size is not None:
        outside |= (coords[:, 0] >= size[0]) | (coords[:, 1] >= size[1])
    if outside.any():
        x, y = coords[np.argmax(outside)]
        where = f" of {size[0]} x {size[1]} px" if size is not None else ""
        raise FeatureFolderError(
            file.path,
            f"{int(outside.sum())} of {len(coords)} coordinates lie outside the slide{where}, "
            f"e.g. ({x}, {y})",
        )


def import_features(
    root: str | Path,
    folder: str | Path,
    encoder: Encoder,
    *,
    slides: str | Path | None = None,
    settings: ArchiveSettings = DEFAULT_SETTINGS,
    on_progress: Callable[[str, int, int | None], None] | None = None,
) -> IndexReport:
    """Build or grow the archive at `root` from the feature files of a TRIDENT or CLAM
    `folder`, embedding nothing. The archive's magnification and tile size are the files'
    (a new archive takes `settings`' reduction, n_features and index metric); `slides` is a
    slide list whose rows give the slides' files (viewable, queryable by region), mpp and
    metadata. Files already stored are skipped; each refused file (unreadable, unknown
    scale, another dimension or scale, coordinates outside its slide) is a failure in the
    report and the others go on."""
    files = find_feature_files(Path(folder))
    listed = read_slide_list(Path(slides)) if slides is not None else {}
    report = IndexReport()
    root = Path(root)
    archive = ArchiveFolder.open(root) if (root / CATALOG).is_file() else None
    with contextlib.ExitStack() as stack:
        if archive is not None:
            stack.enter_context(archive)
            archive.check_encoder(encoder)
            stack.enter_context(archive.writing())
        stored: set[str] = {r.path for r in archive.slides()} if archive else set()
        for done, file in enumerate(files, 1):
            try:
                entry = _prepare(file, listed.get(file.name), encoder.dim)
                if archive is None:
                    wanted = replace(
                        settings,
                        encoder=encoder.name,
                        magnification=entry.scale.magnification,
                        tile_size=entry.scale.patch_size,
                    )
                    archive = stack.enter_context(ArchiveFolder.create(root, wanted, encoder))
                    stack.enter_context(archive.writing())
                _store(archive, file, entry, stored, report)
            except HistosearchError as error:
                report.failures.append((file.name, str(error)))
            if on_progress is not None:
                on_progress("slides", done, len(files))
        if archive is not None:
            layouts = set(archive.settings.get("imported", "").split(",")) - {""}
            archive.catalog.set({"imported": ",".join(sorted(layouts | {files[0].layout}))})
            sync(archive)
    return report


def _store(
    archive: ArchiveFolder, file: FeatureFile, entry: _Entry, stored: set[str], report: IndexReport
) -> None:
    magnification, tile_size = float(archive.settings["magnification"]), archive.tiling.tile_size
    if not entry.scale.matches(magnification, tile_size):
        raise FeatureFolderError(
            file.path,
            f"features cut at {entry.scale}; the archive's at {magnification:g}x, {tile_size} px",
        )
    if entry.key in stored:
        report.skipped += 1
        return
    listed = entry.listed
    archive.store_slide(
        entry.key,
        entry.features,
        entry.coords,
        name=entry.name,
        label=listed.label,
        patient=listed.patient,
        group=listed.group,
        mpp=entry.mpp,
        tile_l0=entry.scale.tile_l0,
        metadata=listed.metadata,
    )
    stored.add(entry.key)
    report.added += 1
    report.patches += len(entry.features)


@dataclass
class ExportReport:
    """What an export wrote: the grid folder, the slides written and those left out (name,
    reason)."""

    folder: Path
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def export_trident(archive: ArchiveFolder, out: str | Path) -> ExportReport:
    """Write the archive's slides in TRIDENT's layout under `out` (a job folder): per slide a
    features file and a patches file with TRIDENT's attributes, and `out/slides.csv` (wsi,
    mpp, label, patient, group and the metadata columns) that `import_features` reads back.
    Patch groups and images, which have no grid on a slide, are left out."""
    out = Path(out)
    magnification = float(archive.settings["magnification"])
    tile_size = archive.tiling.tile_size
    encoder = archive.settings["encoder"]
    metadata = archive.catalog.metadata()
    report = ExportReport(out / trident_grid(Scale(magnification, tile_size, 1.0, 1.0)))
    rows: list[dict[str, str]] = []
    names: set[str] = set()
    for record in archive.slides():
        stored = archive.read(record)
        if stored.paths is not None or record.tile_l0 is None:
            report.skipped.append((record.name, "patch images, not tiles of a slide"))
            continue
        slide = Path(record.path) if Path(record.path).is_file() else None
        name = slide_name(slide) if slide else record.name
        if name in names:
            report.skipped.append((record.name, f"another slide is named {name} already"))
            continue
        names.add(name)
        size = None
        if slide is not None:
            with contextlib.suppress(HistosearchError), open_slide(slide, mpp=record.mpp) as opened:
                size = opened.dimensions
        level0 = magnification * record.tile_l0 / tile_size
        scale = Scale(magnification, tile_size, record.tile_l0, level0)
        write_trident(
            out, name, stored.features, stored.coords, scale, encoder=encoder, level0_size=size
        )
        report.written += 1
        rows.append(
            {
                "wsi": str(slide) if slide else name,
                "mpp": "" if record.mpp is None else repr(record.mpp),
                "label": record.label or "",
                "patient": record.patient or "",
                "group": record.group or "",
                **metadata.get(record.id, {}),
            }
        )
    columns = list(dict.fromkeys(c for row in [dict.fromkeys(LIST_COLUMNS), *rows] for c in row))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SLIDE_LIST) as tmp, tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return report
