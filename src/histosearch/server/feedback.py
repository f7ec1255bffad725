"""Relevance marks on search results, kept in the archive's catalog (`feedback` table).

The table lives in `catalog.sqlite` beside the archive's own tables, written through a
separate connection, so that the marks travel with the archive they judge.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from histosearch.fileio import atomic_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    created TEXT NOT NULL,
    query_id TEXT,
    query_slide INTEGER,
    query_name TEXT NOT NULL,
    region TEXT,
    mode TEXT NOT NULL,
    result_slide INTEGER NOT NULL,
    result_row INTEGER,
    similarity REAL,
    relevant INTEGER NOT NULL
);
"""
COLUMNS = (
    "id",
    "created",
    "query_id",
    "query_slide",
    "query_name",
    "region",
    "mode",
    "result_slide",
    "result_row",
    "similarity",
    "relevant",
)


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


class FeedbackStore:
    """The marks of one archive; usable from several threads."""

    def __init__(self, archive_dir: str | Path) -> None:
        self.path = Path(archive_dir) / "catalog.sqlite"
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def add(self, mark: Mark) -> int:
        """Store a mark; returns its id."""
        values = asdict(mark)
        values["region"] = None if mark.region is None else json.dumps(list(mark.region))
        values["relevant"] = int(mark.relevant)
        values["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        names = list(values)
        with self._lock, self._db:
            cursor = self._db.execute(
                f"INSERT INTO feedback ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [values[n] for n in names],
            )
        return int(cursor.lastrowid)

    def rows(self) -> list[dict[str, object]]:
        """Every mark, oldest first, as the CSV holds it."""
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM feedback ORDER BY id")
            return [dict(zip(COLUMNS, row, strict=True)) for row in cursor]

    def close(self) -> None:
        self._db.close()


def export_csv(
    store: FeedbackStore, out: str | Path, names: dict[int, tuple[str, str | None]]
) -> int:
    """Write every mark to `out` with the result slide's name and label (from `names`, catalog
    id -> (name, label)); returns how many rows were written."""
    rows = store.rows()
    fields = [*COLUMNS, "result_name", "result_label", "query_label"]
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
                }
            )
    return len(rows)
