"""Labelled sets for `eval`: a manifest of patches or slides, or an archive with labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histosearch.errors import HistosearchError
from histosearch.evaluation.metrics import majority_vote
from histosearch.evaluation.settings import METADATA_COLUMNS
from histosearch.inputs import folder_files, read_manifest_rows

MANIFEST_COLUMNS = ("path", "label", *METADATA_COLUMNS, "x", "y")


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


def read_labelled_manifest(path: Path, skip_missing: bool = False) -> LabelledSet:
    """Check a manifest (or a folder of class sub-folders) before any heavy work: columns,
    files, classes."""
    if path.is_dir():
        return read_labelled_folder(path)
    rows, header, missing = read_manifest_rows(path)
    unknown = [c for c in header if c not in MANIFEST_COLUMNS]
    if unknown or "label" not in header:
        raise LabelledSetError(
            path,
            f"columns must be path,label[,{','.join(MANIFEST_COLUMNS[2:])}]; "
            + (f"unknown: {', '.join(unknown)}" if unknown else f"got {', '.join(header)}"),
        )
    if missing and not skip_missing:
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise LabelledSetError(
            path,
            f"{len(missing)} of {len(rows)} listed files are missing (--skip-missing evaluates "
            f"the rest):\n  {listed}",
        )
    unlabelled = [line for line, r in enumerate(rows, start=2) if not (r.get("label") or "")]
    if unlabelled:
        lines = ", ".join(map(str, unlabelled[:10])) + (" ..." if len(unlabelled) > 10 else "")
        raise LabelledSetError(
            path, f"{len(unlabelled)} rows have no label: line {lines} (line 1 is the header)"
        )
    absent = set(missing)
    rows = [r for r in rows if r["path"] not in absent]
    xy = None
    if "x" in header and "y" in header:
        xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    return LabelledSet(
        source=str(path),
        paths=[path.parent / r["path"] for r in rows],
        labels=[r["label"] for r in rows],
        columns={c: [r[c] for r in rows] for c in METADATA_COLUMNS if c in header},
        xy=xy,
        missing=missing,
    )


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
    """The patches of an archive as a labelled set (each patch carries its slide's label),
    their stored features, and the encoder that made them."""
    from histosearch.archive.archive import Archive

    with Archive(archive_dir) as archive:
        features, offsets, records = archive.all_features()
        encoder = archive.settings["encoder"]
        counts = np.diff(offsets)
        paths: list[Path] = []
        for record in records:
            stored = archive.read(record, with_features=False).paths
            paths += [Path(p) for p in stored] if stored else [Path(record.path)] * record.n_patches
    unlabelled = [r.name for r in records if r.label is None]
    if unlabelled:
        raise LabelledSetError(
            archive_dir, f"{len(unlabelled)} slides have no label, e.g. {unlabelled[0]}"
        )

    def per_patch(values: list[str | None]) -> list[str]:
        return [str(v) for v, n in zip(values, counts, strict=True) for _ in range(n)]

    columns = {"slide": per_patch([r.name for r in records])}
    for name, values in (
        ("patient", [r.patient for r in records]),
        ("group", [r.group for r in records]),
    ):
        if all(v is not None for v in values):
            columns[name] = per_patch(values)
    data = LabelledSet(str(archive_dir), paths, per_patch([r.label for r in records]), columns)
    return data, features, encoder
