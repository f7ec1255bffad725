"""Relevance marks on search results, kept in the archive's catalog so that they travel with
the archive they judge, and their CSV export (ground truth for evaluation)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from histosearch.archive.catalog import MARK_COLUMNS, Catalog
from histosearch.fileio import atomic_path


@dataclass(frozen=True)
class Mark:
    """One judgement: was this result (a slide, or one patch of it) relevant to the query?"""

    query_name: str
    mode: str
    result_slide: int
    relevant: bool
    query_id: str | None = None
    query_slide: int | None = None
    region: tuple[int, int, int, int] | None = None
    result_row: int | None = None
    similarity: float | None = None


def add_mark(catalog: Catalog, mark: Mark) -> int:
    """Store a mark in the archive's catalog; returns its id."""
    values = asdict(mark)
    values["region"] = None if mark.region is None else json.dumps(list(mark.region))
    values["relevant"] = int(mark.relevant)
    values["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    return catalog.add_mark(values)


def export_csv(catalog: Catalog, out: str | Path) -> int:
    """Write every mark to `out` with the result slide's name, label and metadata (a column
    `result_COLUMN` each), and the query slide's label; returns how many rows were written."""
    rows = catalog.marks()
    names = {r.id: (r.name, r.label) for r in catalog.slides()}
    metadata = catalog.metadata()
    columns = sorted({c for values in metadata.values() for c in values})
    fields = [*MARK_COLUMNS, "result_name", "result_label", "query_label"]
    fields += [f"result_{c}" for c in columns]
    with atomic_path(out) as tmp, tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            result = names.get(int(row["result_slide"]), ("", None))
            query = names.get(int(row["query_slide"]), ("", None)) if row["query_slide"] else None
            writer.writerow(
                {
                    **row,
                    "relevant": bool(row["relevant"]),
                    "result_name": result[0],
                    "result_label": result[1] or "",
                    "query_label": (query[1] or "") if query else "",
                    **{
                        f"result_{c}": metadata.get(int(row["result_slide"]), {}).get(c, "")
                        for c in columns
                    },
                }
            )
    return len(rows)
