"""What `index` is given: slide files, folders of them, or manifest CSVs of patches or slides."""

from __future__ import annotations

import csv
import difflib
import io
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histosearch.errors import HistosearchError
from histosearch.slide import IMAGE_SUFFIXES, is_dicomweb, one_per_series, parse_dicomweb

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


def catalog_key(path: str | Path) -> str:
    """How an archive's catalog names a source: the resolved path of a file, a DICOMweb
    slide's URL, else the text as given (a manifest group such as `manifest.csv::group=g1`)."""
    if (address := parse_dicomweb(path)) is not None:
        return address.url
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _listed(manifest: Path, value: str) -> Path:
    """What a manifest's `path` value names: a file relative to the manifest, or a DICOMweb
    URL as it is (its canonical form is what `catalog_key` gives)."""
    return Path(value) if is_dicomweb(value) else manifest.parent / value


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
    metadata: dict[str, str] = field(default_factory=dict)
    # the resolution a manifest row gives for a file that records none (as --mpp, and the
    # scan's objective power as --objective-power)
    mpp: float | None = None
    objective_power: float | None = None


# Encodings tried in turn: UTF-8 (with or without the BOM Excel writes), then Windows-1252,
# the usual "ANSI" of spreadsheets, whose printable characters include all of Latin-1's.
FALLBACK_ENCODING = "cp1252"
# A value that must be present on every row: `path` always, `label` when the column exists
# (an empty label is refused, not made a class of its own).
REQUIRED_COLUMNS = ("path", "label")
# The manifest columns histosearch reads itself (x, y: a patch's position, for eval); every
# other column is a slide's metadata.
MANIFEST_ORDER = ("path", "label", "patient", "group", "slide", "x", "y", "mpp", "magnification")
READ_COLUMNS = frozenset(MANIFEST_ORDER)
log = logging.getLogger("histosearch")


def _decode(manifest: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if b"\x00" in data:
        raise ManifestError(manifest, "not a text CSV file (binary content)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        try:
            text = data.decode(FALLBACK_ENCODING)
        except UnicodeDecodeError:
            raise ManifestError(
                manifest, f"neither UTF-8 nor {FALLBACK_ENCODING} text: {error}; save it as UTF-8"
            ) from None
    log.warning("%s: not UTF-8, read as %s (Windows Latin-1)", manifest, FALLBACK_ENCODING)
    return text


def _lines(manifest: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank record; `;` or tab separate the fields when
    the header has no comma but one of them."""
    header = text.split("\n", 1)[0]
    delimiter = next((d for d in ",;\t" if d in header), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    line = 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                yield line, fields
            line = reader.line_num + 1
    except csv.Error as error:
        raise ManifestError(manifest, f"line {line}: {error}") from None


def _lines_named(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}" + (
        f" and {len(numbers) - 5} more" if len(numbers) > 5 else ""
    )


def read_table(
    table: Path, what: str = "manifest"
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV file (a `what`) as its columns and its records, (line number, {column: stripped
    value}).

    Read as UTF-8 (a BOM is fine) or else Windows-1252, with a warning; `;` or tab separators
    are recognised. Rows with more or fewer fields than the header are refused by number."""
    if table.is_dir():
        raise ManifestError(table, f"is a directory, not a {what} CSV")
    try:
        data = table.read_bytes()
    except FileNotFoundError:
        raise ManifestError(table, f"no such {what}") from None
    except OSError as error:
        raise ManifestError(table, f"cannot read: {error.strerror}") from None
    records = list(_lines(table, _decode(table, data)))
    if not records:
        raise ManifestError(table, "empty: no header row")
    columns = [c.strip() for c in records[0][1]]
    malformed = [n for n, fields in records[1:] if len(fields) != len(columns)]
    if malformed:
        raise ManifestError(
            table,
            f"{_lines_named(malformed)}: not {len(columns)} fields as in the header "
            f"({','.join(columns)})",
        )
    rows = [
        (number, {c: f.strip() for c, f in zip(columns, fields, strict=True)})
        for number, fields in records[1:]
    ]
    return columns, rows


def column_mapping(values: Iterable[str]) -> dict[str, str]:
    """`NAME=COLUMN` options (`label=diagnosis`) as {NAME: COLUMN}: the manifest's COLUMN is
    read as histosearch's column NAME (one of `READ_COLUMNS`)."""
    mapping: dict[str, str] = {}
    for value in values:
        name, _, column = (part.strip() for part in value.partition("="))
        if not name or not column:
            raise ManifestError(value, "--column takes NAME=COLUMN, e.g. label=diagnosis")
        if name not in READ_COLUMNS:
            raise ManifestError(
                value, f"{name!r} is none of histosearch's columns ({_known_columns()})"
            )
        if name in mapping:
            raise ManifestError(value, f"{name} is mapped twice")
        mapping[name] = column
    return mapping


def _known_columns() -> str:
    return ", ".join(sorted(READ_COLUMNS, key=MANIFEST_ORDER.index))


def _mapped(manifest: Path, columns: list[str], mapping: Mapping[str, str]) -> list[str]:
    """The header with each mapped COLUMN renamed to its NAME."""
    renamed = {column: name for name, column in mapping.items()}
    for name, column in mapping.items():
        if column not in columns:
            raise ManifestError(
                manifest, f"--column {name}={column}: no column {column!r} ({', '.join(columns)})"
            )
        if name in columns and name not in renamed:
            raise ManifestError(
                manifest, f"--column {name}={column}: the manifest has a {name!r} column already"
            )
    return [renamed.get(column, column) for column in columns]


def _lookalike(column: str, names: Iterable[str] = MANIFEST_ORDER[1:]) -> str | None:
    """The histosearch column that `column` (a manifest's) looks like: one of its words
    (`patient_or_slide_id`: patient), or a near spelling (`lable`: label)."""
    names = list(names)
    words = set(re.split(r"[^a-z]+", column.lower()))
    return next((n for n in names if n in words), None) or next(
        iter(difflib.get_close_matches(column.lower(), names, 1, 0.75)), None
    )


def warn_unknown_columns(manifest: Path, columns: Iterable[str], also: Iterable[str] = ()) -> None:
    """The one warning `index` and `eval` give for a manifest's columns that are none of
    histosearch's (`index` keeps them as slide metadata, `eval` does not use them), with the
    `--column` mapping that would read a look-alike as one of them."""
    known = READ_COLUMNS | set(also)
    unknown = [c for c in columns if c not in known]
    if not unknown:
        return
    hints = [f"--column {guess}={c}" for c in unknown if (guess := _lookalike(c)) is not None]
    log.warning(
        "%s: column%s %s %s none of histosearch's (%s): kept as slide metadata by index, not "
        "used by eval%s",
        manifest,
        "s" if len(unknown) > 1 else "",
        ", ".join(unknown),
        "are" if len(unknown) > 1 else "is",
        _known_columns(),
        f"; to read one as histosearch's, give {' '.join(hints)}" if hints else "",
    )


def read_manifest_rows(
    manifest: Path, required: Sequence[str] = (), mapping: Mapping[str, str] | None = None
) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """A CSV manifest's rows, its columns, and the listed `path`s (relative to the CSV) that
    are not files; `mapping` maps histosearch's column names to the manifest's
    (`column_mapping`), whose values are then read under histosearch's names.

    Read as `read_table` reads it. Refused, naming the line numbers: rows without a `path`, a
    `label` (when the column exists) or another `required` value. Rows listing a file already
    listed are dropped with a warning (the first is kept)."""
    header, records = read_table(manifest)
    columns = _mapped(manifest, header, mapping or {})
    if columns != header:
        records = [
            (number, dict(zip(columns, row.values(), strict=True))) for number, row in records
        ]
    if "path" not in columns:
        shown = ", ".join(c[:40] for c in columns[:10])
        raise ManifestError(manifest, f"no 'path' column (columns: {shown})")
    for column in required:
        if column not in columns:
            like = next((c for c in columns if _lookalike(c, [column])), None)
            raise ManifestError(
                manifest,
                f"no '{column}' column (columns: {', '.join(columns)})"
                + (f"; --column {column}={like} reads {like} as it" if like else ""),
            )
    needed = [c for c in (*REQUIRED_COLUMNS, *required) if c in columns]
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    duplicates: list[str] = []
    for number, row in records:
        empty = [c for c in needed if not row[c]]
        if empty:
            raise ManifestError(manifest, f"line {number}: no {' or '.join(empty)}")
        key = os.path.normpath(manifest.parent / row["path"])
        if key in seen:
            duplicates.append(f"line {number} repeats line {seen[key]} ({row['path']})")
            continue
        seen[key] = number
        rows.append(row)
    if duplicates:
        log.warning(
            "%s: %d rows list a file already listed, kept the first: %s",
            manifest,
            len(duplicates),
            "; ".join(duplicates[:3]) + ("; ..." if len(duplicates) > 3 else ""),
        )
    missing = [
        r["path"]
        for r in rows
        if not is_dicomweb(r["path"]) and not (manifest.parent / r["path"]).is_file()
    ]
    return rows, columns, missing


def read_manifest(
    manifest: Path, group_by: str | None, mapping: Mapping[str, str] | None = None
) -> list[Item]:
    """Items of a CSV with a `path` column (relative to the CSV) and optional metadata (every
    column but `READ_COLUMNS`, with a warning); `group_by` names a column whose values gather
    patches into one archive slide; `mapping` renames columns (`read_manifest_rows`).

    Listed files that do not exist stay in, to be reported one by one when they are read;
    a manifest none of whose files exist is refused."""
    required = () if group_by is None else (group_by,)
    rows, header, missing = read_manifest_rows(manifest, required, mapping)
    warn_unknown_columns(manifest, header, required)
    extra = [c for c in header if c not in READ_COLUMNS and c != group_by]
    if rows and len(missing) == len(rows):
        raise ManifestError(
            manifest,
            f"none of the {len(rows)} listed files exists, e.g. {missing[0]} "
            f"(paths are relative to {manifest.parent})",
        )

    def item(key: str, name: str, members: list[dict[str, str]], is_group: bool) -> Item:
        first = members[0]
        mpp, objective_power = row_resolution(manifest, first)
        scales = Counter(row_resolution(manifest, m) for m in members)
        if len(scales) > 1:  # one archive entry records one resolution
            log.warning(
                "%s: group %s mixes resolutions (%s): its entry records the first row's; "
                "to keep them apart, group by a column that also tells them apart",
                manifest,
                name,
                ", ".join(f"{_scale(*at)}: {n} row{'s' * (n > 1)}" for at, n in scales.items()),
            )
        return Item(
            key=key,
            name=name,
            paths=[_listed(manifest, m["path"]) for m in members],
            label=first.get("label") or None,
            patient=first.get("patient") or None,
            group=first.get("group") or (first.get(group_by) if group_by else None) or None,
            is_group=is_group,
            # a group's metadata: the values all its patches share
            metadata={
                c: first[c] for c in extra if first[c] and all(m[c] == first[c] for m in members)
            },
            mpp=mpp,
            objective_power=objective_power,
        )

    if group_by is None:
        return [
            item(catalog_key(_listed(manifest, r["path"])), Path(r["path"]).name, [r], False)
            for r in rows
        ]
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row[group_by]].append(row)
    return [
        item(f"{manifest.resolve()}::{group_by}={value}", value, members, True)
        for value, members in groups.items()
    ]


def _scale(mpp: float | None, objective_power: float | None) -> str:
    parts = [f"{mpp:g} um/px" if mpp else "", f"{objective_power:g}x" if objective_power else ""]
    return " ".join(p for p in parts if p) or "none given"


def row_resolution(manifest: Path, row: dict[str, str]) -> tuple[float | None, float | None]:
    """A row's `mpp` (um per pixel) and `magnification` (the scan's: 40, 40x or 40X)."""
    values: list[float | None] = []
    for column in ("mpp", "magnification"):
        text = row.get(column) or ""
        if not text:
            values.append(None)
            continue
        try:
            number = float(text.rstrip("xX"))
        except ValueError:
            number = float("nan")
        if not 0 < number < float("inf"):
            raise ManifestError(
                manifest, f"{row['path']}: {column} {text!r} is not a positive number"
            )
        values.append(number)
    return values[0], values[1]


def collect_items(
    inputs: list[Path],
    group_by: str | None = None,
    failures: list[tuple[str, str]] | None = None,
    mapping: Mapping[str, str] | None = None,
) -> list[Item]:
    """Expand slide files, folders (searched recursively) and manifest CSVs (their columns
    renamed by `mapping`, as `read_manifest_rows` does) into items.

    With a `failures` list, an input that gives nothing (a manifest refused, a folder without
    slides) is recorded there as (name, message) and the others go on; without, it raises."""
    if mapping and inputs and not any(p.suffix.lower() == ".csv" for p in inputs):
        renamed = ", ".join(f"{name}={column}" for name, column in mapping.items())
        raise ManifestError(
            inputs[0], f"--column {renamed}: only manifest CSVs have columns, and none is given"
        )
    items: list[Item] = []
    for path in inputs:
        try:
            items.extend(_expand(path, group_by, mapping))
        except HistosearchError as error:
            if failures is None:
                raise
            failures.append((path.name, str(error)))
    return items


def folder_files(folder: Path) -> dict[Path, str | None]:
    """The slide and image files of `folder` (searched recursively, one per DICOM series),
    each with its label: the name of its class sub-folder when every file lies in one
    (`DIR/CLASS/IMAGE`, the ImageFolder layout), else none."""
    files = one_per_series(
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES)
    )
    if not files:
        raise ManifestError(folder, "a folder without slide or image files")
    classes = all(len(p.relative_to(folder).parts) == 2 for p in files)
    return {p: p.parent.name if classes else None for p in files}


def _expand(path: Path, group_by: str | None, mapping: Mapping[str, str] | None) -> list[Item]:
    if path.suffix.lower() == ".csv":
        return read_manifest(path, group_by, mapping)
    if path.is_dir():
        return [
            Item(catalog_key(p), p.name, [p], label=label)
            for p, label in folder_files(path).items()
        ]
    if not os.path.lexists(path) and not is_dicomweb(str(path)):  # a bad link: its reader says
        raise ManifestError(path, "no such file or folder")
    return [Item(catalog_key(path), path.name, [path])]
