"""Labelled sets for `eval`: a manifest of patches or slides, or an archive with labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histosearch.errors import HistosearchError
from histosearch.evaluation.metrics import majority_vote
from histosearch.evaluation.settings import METADATA_COLUMNS
from histosearch.inputs import (
    folder_files,
    read_manifest_rows,
    row_resolution,
    warn_unknown_columns,
)


class LabelledSetError(HistosearchError):
    """A labelled set that cannot be evaluated as asked."""


@dataclass
class LabelledSet:
    """Items (patch files, or rows of an archive) with their labels and optional metadata."""

    source: str
    paths: list[Path]
    labels: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)
    xy: np.ndarray | None = None
    missing: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)  # an archive's slides left out
    # each item's (mpp, magnification) from its manifest row, for files that record none
    resolutions: list[tuple[float | None, float | None]] | None = None

    def column(self, name: str) -> list[str] | None:
        return self.columns.get(name)


def read_labelled_folder(folder: Path) -> LabelledSet:
    """The images of a folder of class sub-folders (`DIR/CLASS/IMAGE`), labelled by them."""
    files = folder_files(folder)
    if None in files.values():
        raise LabelledSetError(
            folder, "not a folder of class sub-folders (DIR/CLASS/IMAGE, as ImageFolder reads)"
        )
    return LabelledSet(source=str(folder), paths=list(files), labels=list(files.values()))


def read_labelled_manifest(
    path: Path, skip_missing: bool = False, mapping: Mapping[str, str] | None = None
) -> LabelledSet:
    """Check a manifest (or a folder of class sub-folders) before any heavy work: columns
    (read as `index` reads them: `mapping` renames them, unknown ones are warned about),
    files, classes."""
    if path.is_dir():
        if mapping:
            renamed = ", ".join(f"{name}={column}" for name, column in mapping.items())
            raise LabelledSetError(
                path,
                f"--column {renamed}: a folder of class sub-folders has no columns to read "
                "(give a manifest CSV to read its columns)",
            )
        return read_labelled_folder(path)
    rows, header, missing = read_manifest_rows(path, (), mapping)
    warn_unknown_columns(path, header)
    if "label" not in header:
        raise LabelledSetError(
            path,
            f"no 'label' column (columns: {', '.join(header)}); --column label=COLUMN reads "
            "another as the label",
        )
    if missing and not skip_missing:
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise LabelledSetError(
            path,
            f"{len(missing)} of {len(rows)} listed files are missing (--skip-missing evaluates "
            f"the rest):\n  {listed}",
        )
    absent = set(missing)
    rows = [r for r in rows if r["path"] not in absent]
    return LabelledSet(
        source=str(path),
        paths=[path.parent / r["path"] for r in rows],
        labels=[r["label"] for r in rows],
        columns={c: [r[c] for r in rows] for c in METADATA_COLUMNS if c in header},
        xy=_coordinates(path, rows, header),
        missing=missing,
        resolutions=[row_resolution(path, r) for r in rows],
    )


def _coordinates(path: Path, rows: list[dict[str, str]], header: list[str]) -> np.ndarray | None:
    """The rows' x, y as an array; None without the columns or when they are all empty
    (BreakHis' manifest has them, empty), refused when only some rows give them."""
    if "x" not in header or "y" not in header or not any(r["x"] or r["y"] for r in rows):
        return None
    try:
        return np.array([[float(r["x"]), float(r["y"])] for r in rows])
    except ValueError:
        bad = next(r for r in rows if not _is_number(r["x"]) or not _is_number(r["y"]))
        raise LabelledSetError(
            path, f"{bad['path']}: x, y {bad['x']!r}, {bad['y']!r} are not numbers"
        ) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_evaluable(data: LabelledSet, ks: Sequence[int], exclude: str | None) -> None:
    """Refuse a set with one class, or too few items for the largest k."""
    classes = sorted(set(data.labels))
    if len(classes) < 2:
        raise LabelledSetError(data.source, f"needs at least two labels, found {classes}")
    if exclude is not None and data.column(exclude) is None:
        raise LabelledSetError(data.source, f"--exclude {exclude}: no such column")
    if len(data.labels) <= max(ks):
        raise LabelledSetError(
            data.source, f"{len(data.labels)} items cannot give top-{max(ks)} neighbours"
        )


def group_features(
    features: np.ndarray, data: LabelledSet, column: str
) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Patches gathered into slides by `column`: features, majority labels, slide names."""
    values = data.column(column)
    if values is None:
        raise LabelledSetError(data.source, f"--slide-column {column}: no such column")
    order: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        order.setdefault(value, []).append(index)
    names = list(order)
    slides = [features[order[name]] for name in names]
    labels = [str(majority_vote([data.labels[i] for i in order[name]])) for name in names]
    return slides, labels, names


def archive_labelled_set(archive_dir: Path) -> tuple[LabelledSet, np.ndarray, str]:
    """The patches of an archive's labelled slides as a labelled set (each patch carries its
    slide's label; the unlabelled slides are named in `unlabelled`), their stored features,
    and the encoder that made them."""
    from histosearch.archive.archive import Archive

    with Archive(archive_dir) as archive:
        features, offsets, records = archive.all_features()
        encoder = archive.settings["encoder"]
        kept = [i for i, r in enumerate(records) if r.label is not None]
        if not kept:
            raise LabelledSetError(archive_dir, f"none of its {len(records)} slides has a label")
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in kept])
        unlabelled = [r.name for r in records if r.label is None]
        records = [records[i] for i in kept]
        features = features[rows]
        counts = np.array([r.n_patches for r in records])
        paths: list[Path] = []
        for record in records:
            stored = archive.read(record, with_features=False).paths
            paths += [Path(p) for p in stored] if stored else [Path(record.path)] * record.n_patches

    def per_patch(values: list[str | None]) -> list[str]:
        return [str(v) for v, n in zip(values, counts, strict=True) for _ in range(n)]

    columns = {"slide": per_patch([r.name for r in records])}
    for name, values in (
        ("patient", [r.patient for r in records]),
        ("group", [r.group for r in records]),
    ):
        if all(v is not None for v in values):
            columns[name] = per_patch(values)
    labels = per_patch([r.label for r in records])
    data = LabelledSet(str(archive_dir), paths, labels, columns, unlabelled=unlabelled)
    return data, features, encoder
