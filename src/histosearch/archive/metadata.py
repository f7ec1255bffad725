"""Slides' metadata beyond the built-in columns (organ, site, diagnosis, year, ...): kept as
text in the catalog and in every feature file, typed per column when read (a column whose
values are all numbers is a number, all ISO dates `YYYY-MM-DD` a date, anything else text),
and updated from a CSV by `annotate`. A value is only ever compared or shown, never run."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from histosearch.archive.catalog import SlideRecord
from histosearch.errors import HistosearchError
from histosearch.inputs import READ_COLUMNS, catalog_key, read_table

KINDS = ("number", "date", "text")
# Names histosearch gives a slide itself: no metadata column may take one.
BUILTIN_COLUMNS = frozenset(READ_COLUMNS | {"id", "name"})
# The columns of an annotation CSV that name the slide a row is about.
KEY_COLUMNS = ("slide", "path")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class MetadataError(HistosearchError):
    """An annotation CSV that cannot be applied as given."""


def parse_number(text: str) -> float:
    """A finite number, or ValueError."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def parse_date(text: str) -> date:
    """An ISO date (YYYY-MM-DD), or ValueError."""
    if not _ISO_DATE.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not a date YYYY-MM-DD")
    return date.fromisoformat(text.strip())


PARSERS = {"number": parse_number, "date": parse_date, "text": str}


def column_kind(values: Iterable[str]) -> str:
    """`number` when every value is one, else `date` when every value is one, else `text`."""
    values = list(values)
    for kind in ("number", "date"):
        try:
            for value in values:
                PARSERS[kind](value)
        except ValueError:
            continue
        return kind
    return "text"


@dataclass(frozen=True)
class Metadata:
    """Every slide's metadata as text ({slide id: {column: value}}) and each column's kind."""

    values: dict[int, dict[str, str]]
    kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Mapping[int, Mapping[str, str]]) -> Metadata:
        """The metadata of `values`, each column typed by all its values."""
        by_column: dict[str, list[str]] = {}
        for slide in values.values():
            for column, value in slide.items():
                by_column.setdefault(column, []).append(value)
        kinds = {column: column_kind(found) for column, found in sorted(by_column.items())}
        return cls({int(k): dict(v) for k, v in values.items()}, kinds)

    @property
    def columns(self) -> list[str]:
        """The metadata columns, sorted."""
        return list(self.kinds)

    def of_slide(self, slide_id: int) -> dict[str, str]:
        """One slide's values, by column (empty when it has none)."""
        return dict(self.values.get(slide_id, {}))

    def distinct(self, column: str) -> list[str]:
        """The distinct values of a column, sorted as its kind sorts them."""
        found = {v[column] for v in self.values.values() if column in v}
        return sorted(found, key=PARSERS[self.kinds.get(column, "text")])


def annotations(table: Path, records: Sequence[SlideRecord]) -> dict[int, dict[str, str | None]]:
    """The updates an annotation CSV makes: {slide id: {column: value, None for an empty
    cell}}. Rows are keyed by `slide` (a slide's name) or `path` (its file, relative to the
    CSV, or its catalog path). Refused, naming the rows, before anything changes: no key
    column, a column with a built-in name, a key matching no slide (or several), two rows for
    one slide."""
    columns, rows = read_table(table, "metadata")
    keys = [c for c in KEY_COLUMNS if c in columns]
    if not keys:
        raise MetadataError(
            table, f"no 'slide' or 'path' column to name the slides (columns: {', '.join(columns)})"
        )
    key = keys[-1]  # a path names a slide more surely than a name
    clashing = [c for c in columns if c in BUILTIN_COLUMNS and c not in keys]
    if clashing:
        raise MetadataError(
            table,
            f"column {', '.join(clashing)}: built-in names, not metadata (the catalog sets "
            f"them when indexing); rename the column",
        )
    values = [c for c in columns if c not in keys]
    if not values:
        raise MetadataError(table, f"no metadata column beside {key!r}")
    by_path = {r.path: r for r in records}
    by_name: dict[str, list[SlideRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    updates: dict[int, dict[str, str | None]] = {}
    first_line: dict[int, int] = {}
    unmatched, ambiguous, repeated = [], [], []
    for line, row in rows:
        if key == "path":
            found = [
                by_path[p] for p in (catalog_key(table.parent / row[key]), row[key]) if p in by_path
            ]
        else:
            found = by_name.get(row[key], [])
        if not found:
            unmatched.append(f"line {line} ({row[key]})")
        elif len({r.id for r in found}) > 1:
            ambiguous.append(f"line {line} ({row[key]}: {len(found)} slides)")
        elif found[0].id in updates:
            repeated.append(f"line {line} repeats line {first_line[found[0].id]} ({row[key]})")
        else:
            updates[found[0].id] = {c: row[c] or None for c in values}
            first_line[found[0].id] = line
    for problems, what in (
        (unmatched, f"no archived slide has that {'path' if key == 'path' else 'name'}"),
        (ambiguous, "several slides have that name; key the rows by path"),
        (repeated, "one slide listed twice"),
    ):
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise MetadataError(table, f"{shown}: {what}; nothing was changed")
    return updates
