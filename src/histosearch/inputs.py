"""What `index` is given: slide files, folders of them, or manifest CSVs of patches or slides."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from histosearch.archive.archive import catalog_key
from histosearch.errors import HistosearchError
from histosearch.slide import IMAGE_SUFFIXES

SLIDE_SUFFIXES = (
    frozenset(
        {
            ".svs",
            ".tif",
            ".tiff",
            ".ndpi",
            ".vms",
            ".vmu",
            ".scn",
            ".mrxs",
            ".bif",
            ".dcm",
            ".svslide",
        }
    )
    | IMAGE_SUFFIXES
)


class ManifestError(HistosearchError):
    """A manifest that cannot be used as given."""


@dataclass
class Item:
    """One archive entry to build: a slide file, or a group of patch images standing for one."""

    key: str
    name: str
    paths: list[Path]
    label: str | None = None
    patient: str | None = None
    group: str | None = None
    is_group: bool = False


def read_manifest_rows(manifest: Path) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """A CSV manifest's rows, its columns, and the listed `path`s (relative to the CSV) that
    are not files; a missing manifest or one without a `path` column is refused."""
    if not manifest.is_file():
        raise ManifestError(manifest, "no such manifest")
    with manifest.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if "path" not in columns:
        raise ManifestError(manifest, f"no 'path' column (columns: {', '.join(columns)})")
    missing = [r["path"] for r in rows if not (manifest.parent / r["path"]).is_file()]
    return rows, columns, missing


def read_manifest(manifest: Path, group_by: str | None) -> list[Item]:
    """Items of a CSV with a `path` column (relative to the CSV) and optional metadata;
    `group_by` names a column whose values gather patches into one archive slide."""
    rows, columns, missing = read_manifest_rows(manifest)
    if group_by is not None and group_by not in columns:
        raise ManifestError(manifest, f"--group-by {group_by}: no such column")
    if missing:
        raise ManifestError(
            manifest, f"{len(missing)} listed files do not exist, e.g. {', '.join(missing[:3])}"
        )

    def item(key: str, name: str, members: list[dict[str, str]], is_group: bool) -> Item:
        first = members[0]
        return Item(
            key=key,
            name=name,
            paths=[manifest.parent / m["path"] for m in members],
            label=first.get("label"),
            patient=first.get("patient"),
            group=first.get("group") or (first.get(group_by) if group_by else None),
            is_group=is_group,
        )

    if group_by is None:
        return [
            item(catalog_key(manifest.parent / r["path"]), Path(r["path"]).name, [r], False)
            for r in rows
        ]
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row[group_by]].append(row)
    return [
        item(f"{manifest.resolve()}::{group_by}={value}", value, members, True)
        for value, members in groups.items()
    ]


def collect_items(inputs: list[Path], group_by: str | None = None) -> list[Item]:
    """Expand slide files, folders (searched recursively) and manifest CSVs into items."""
    items: list[Item] = []
    for path in inputs:
        if path.suffix.lower() == ".csv":
            items.extend(read_manifest(path, group_by))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES)
            items.extend(Item(catalog_key(p), p.name, [p]) for p in files)
        else:
            items.append(Item(catalog_key(path), path.name, [path]))
    return items
