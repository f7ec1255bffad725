"""The archive's catalog: one SQLite file holding the settings it was built with, one row per
slide (or patch group) with where its features are and its rows in the search store, and the
relevance marks given to search results. Every SQL statement on the file is written here.

A slide row is committed in one transaction once its feature file is written and, after the
first batch has fitted the reduction, once its searchable vectors are in the store: rows whose
`row_start` is NULL are embedded but not yet searchable, and searches do not see them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from histosearch.errors import HistosearchError
from histosearch.slide.base import magnification_from_mpp

CATALOG = "catalog.sqlite"
# A patch recorded within this fraction of the archive's magnification is at its scale.
SCALE_TOLERANCE = 0.1
SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slides (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    label TEXT,
    patient TEXT,
    grp TEXT,
    mpp REAL,
    n_patches INTEGER NOT NULL,
    feature_file TEXT NOT NULL,
    tile_l0 REAL,
    row_start INTEGER,
    features_crc INTEGER,
    store_crc INTEGER
);
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
CREATE TABLE IF NOT EXISTS metadata (
    slide INTEGER NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (slide, name)
);
"""
# PRAGMA user_version of a catalog with every table above (1: settings and slides only; 2: the
# feedback table; 3: the checksums of each slide's feature file and store rows, and the
# metadata table).
SCHEMA_VERSION = 3
COLUMNS = (
    "id, name, path, label, patient, grp, mpp, n_patches, feature_file, tile_l0, row_start, "
    "features_crc, store_crc"
)
# What a new slide row is given (id, row_start and store_crc aside).
SLIDE_FIELDS = (
    "name",
    "path",
    "label",
    "patient",
    "grp",
    "mpp",
    "n_patches",
    "feature_file",
    "features_crc",
)
# Columns added since the first catalogs, with their types (added to an older catalog on open).
ADDED_COLUMNS = {
    "tile_l0": "REAL",
    "row_start": "INTEGER",
    "features_crc": "INTEGER",
    "store_crc": "INTEGER",
}
MARK_COLUMNS = (
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


class ArchiveError(HistosearchError):
    """A missing, empty, damaged or incompatible archive."""


@dataclass(frozen=True)
class SlideRecord:
    """One catalog row: a slide, or a group of patches standing for one.

    `tile_l0` is the side of one tile in level-0 pixels (None for patch images, each embedded
    whole); `row_start` is the slide's first row in the search store (None until stored).
    `features_crc` is the CRC-32 of its whole feature file, `store_crc` that of its rows
    of the search store (vectors, then coordinates): None in archives from before checksums.
    """

    id: int
    name: str
    path: str
    label: str | None
    patient: str | None
    group: str | None
    mpp: float | None
    n_patches: int
    feature_file: str
    tile_l0: float | None = None
    row_start: int | None = None
    features_crc: int | None = None
    store_crc: int | None = None

    def scale_note(self, magnification: float) -> str | None:
        """How the entry's scale differs from the archive's `magnification`: "unknown" for
        patch images that record none (embedded whole, whatever their scale), "40x" for
        patches recorded at another; None for a slide, tiled at the magnification."""
        if self.tile_l0 is not None:
            return None
        if self.mpp is None:
            return "unknown"
        own = magnification_from_mpp(self.mpp)
        return None if abs(own / magnification - 1) <= SCALE_TOLERANCE else f"{own:.3g}x"

    @property
    def rows(self) -> range:
        """The slide's rows in the search store."""
        if self.row_start is None:
            raise ArchiveError(self.name, "not yet in the search store")
        return range(self.row_start, self.row_start + self.n_patches)


def scale_summary(records: Iterable[SlideRecord], magnification: float) -> str | None:
    """The entries whose scale is not the archive's (`SlideRecord.scale_note`), counted:
    "60 of 62 entries not at 5x (60 of unknown scale)", or None when all are."""
    records = list(records)
    notes: dict[str, int] = {}
    for record in records:
        if (note := record.scale_note(magnification)) is not None:
            notes[note] = notes.get(note, 0) + 1
    if not notes:
        return None
    counted = ", ".join(
        f"{n} of unknown scale" if note == "unknown" else f"{n} at {note}"
        for note, n in sorted(notes.items(), key=lambda pair: (-pair[1], pair[0]))
    )
    return f"{sum(notes.values())} of {len(records)} entries not at {magnification:g}x ({counted})"


class Catalog:
    """The SQLite catalog of one archive folder; every damage is reported as ArchiveError."""

    def __init__(self, root: Path, create: bool = False) -> None:
        self.path = root / CATALOG
        self._lock = threading.Lock()  # one connection, shared by a server's threads
        if not create and not self.path.is_file():
            raise ArchiveError(root, "no archive here (build one with histosearch index)")
        # A folder that cannot be written (a read-only disk or mount, a shared archive): the
        # catalog is read as it is (no WAL, which needs its -shm file written; no migration).
        self.read_only = self.path.is_file() and not os.access(root, os.W_OK)
        try:
            # autocommit off: writes go through `with self._db:` transactions
            target = f"file:{self.path}?mode=ro&immutable=1" if self.read_only else self.path
            self._db = sqlite3.connect(
                target, timeout=30, check_same_thread=False, uri=self.read_only
            )
            tables = {
                row[0]
                for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if not create and not {"settings", "slides"} <= tables:
                self._db.close()
                raise ArchiveError(
                    self.path,
                    "not a histosearch catalog (empty or damaged); "
                    "run histosearch check --archive DIR --repair",
                )
            if not self.read_only:
                self._db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(slides)")}
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None
        if self.read_only:
            return
        for column, kind in ADDED_COLUMNS.items():
            if column not in columns:  # an archive from before the column
                with self._db:
                    self._db.execute(f"ALTER TABLE slides ADD COLUMN {column} {kind}")
        if self._run("PRAGMA user_version")[0][0] != SCHEMA_VERSION:
            self._write([(f"PRAGMA user_version = {SCHEMA_VERSION}", ())])

    def _damaged(self, error: Exception) -> ArchiveError:
        return ArchiveError(
            self.path, f"damaged catalog ({error}); run histosearch check --archive DIR --repair"
        )

    def _run(self, sql: str, args: Iterable[object] = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, tuple(args)).fetchall()
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None

    def _write(self, statements: list[tuple[str, Iterable[object]]]) -> list[int]:
        """Run statements in one transaction; returns each statement's last row id."""
        ids = []
        try:
            with self._lock, self._db:
                for sql, args in statements:
                    ids.append(self._db.execute(sql, tuple(args)).lastrowid)
        except sqlite3.OperationalError as error:  # disk full, read-only folder, locked
            raise ArchiveError(self.path, f"cannot write the catalog: {error}") from None
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None
        return ids

    def settings(self) -> dict[str, str]:
        return dict(self._run("SELECT key, value FROM settings"))

    def set(self, values: dict[str, str]) -> None:
        self._write(
            [("INSERT OR REPLACE INTO settings VALUES (?, ?)", item) for item in values.items()]
        )

    def unset(self, keys: Iterable[str]) -> None:
        """Remove settings."""
        self._write([("DELETE FROM settings WHERE key = ?", (key,)) for key in keys])

    def stored_snapshot(self) -> tuple[dict[str, str], list[SlideRecord]]:
        """The settings and the slides in the search store (by store row), read in one
        transaction: a reindex committing in between cannot pair one generation's settings
        with the other's rows."""
        try:
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    settings = dict(self._db.execute("SELECT key, value FROM settings"))
                    rows = self._db.execute(
                        f"SELECT {COLUMNS} FROM slides WHERE row_start IS NOT NULL "
                        "ORDER BY row_start"
                    ).fetchall()
                finally:
                    self._db.execute("COMMIT")
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None
        return settings, [SlideRecord(*row) for row in rows]

    def add_slides(
        self, rows: Sequence[Mapping[str, object]], ignore_known: bool = False
    ) -> list[int]:
        """Insert slide rows (`SLIDE_FIELDS`, optional `id`, `tile_l0`, `row_start`,
        `store_crc` and `metadata`, a mapping of column to text value) in one transaction;
        their ids. With `ignore_known`, a row whose path is there already is skipped."""
        optional = ("id", "tile_l0", "row_start", "store_crc")
        statements: list[tuple[str, Iterable[object]]] = []
        inserted = []  # the positions of the slide rows' statements
        for row in rows:
            names = [*SLIDE_FIELDS, *(k for k in optional if row.get(k) is not None)]
            verb = "INSERT OR IGNORE" if ignore_known else "INSERT"
            marks = ", ".join("?" * len(names))
            sql = f"{verb} INTO slides ({', '.join(names)}) VALUES ({marks})"
            statements.append((sql, [row[n] for n in names]))
            inserted.append(len(statements) - 1)
            statements += _metadata_statements(
                "(SELECT id FROM slides WHERE path = ?)", (row["path"],), row.get("metadata") or {}
            )
        ids = self._write(statements)
        return [ids[i] for i in inserted]

    def set_stored(
        self, stored: Mapping[int, tuple[int | None, int | None]], generation: int | None = None
    ) -> None:
        """Record slides' first rows in the search store and their rows' checksum (by id:
        (row_start, store_crc)) and, with `generation`, the store generation they belong to,
        in one transaction."""
        statements: list[tuple[str, Iterable[object]]] = [
            ("UPDATE slides SET row_start = ?, store_crc = ? WHERE id = ?", (*rows, slide_id))
            for slide_id, rows in stored.items()
        ]
        if generation is not None:
            statements.append(
                ("INSERT OR REPLACE INTO settings VALUES ('generation', ?)", (str(generation),))
            )
        self._write(statements)

    def remove_slides(self, ids: Iterable[int]) -> None:
        """Delete slide rows by id, in one transaction."""
        statements: list[tuple[str, Iterable[object]]] = []
        for slide_id in ids:
            statements.append(("DELETE FROM metadata WHERE slide = ?", (int(slide_id),)))
            statements.append(("DELETE FROM slides WHERE id = ?", (int(slide_id),)))
        self._write(statements)

    def metadata(self) -> dict[int, dict[str, str]]:
        """Every slide's metadata beyond the built-in columns, as text: {slide id: {column:
        value}} (slides without any are left out)."""
        values: dict[int, dict[str, str]] = {}
        for slide, name, value in self._run(
            "SELECT slide, name, value FROM metadata ORDER BY slide, name"
        ):
            values.setdefault(slide, {})[name] = value
        return values

    def set_metadata(
        self,
        updates: Mapping[int, Mapping[str, str | None]],
        features_crc: Mapping[int, int] | None = None,
    ) -> None:
        """Set slides' metadata values (by slide id, then column; None removes the value) and
        the checksums of their rewritten feature files, in one transaction."""
        statements: list[tuple[str, Iterable[object]]] = []
        for slide_id, values in updates.items():
            statements += _metadata_statements("?", (int(slide_id),), values)
        for slide_id, crc in (features_crc or {}).items():
            statements.append(
                ("UPDATE slides SET features_crc = ? WHERE id = ?", (crc, int(slide_id)))
            )
        self._write(statements)

    def slides(self, stored_only: bool = False) -> list[SlideRecord]:
        """Catalog rows by id (only those in the search store, by store row, if asked)."""
        where = " WHERE row_start IS NOT NULL ORDER BY row_start" if stored_only else " ORDER BY id"
        return [SlideRecord(*row) for row in self._run(f"SELECT {COLUMNS} FROM slides" + where)]

    def stored_end(self) -> int:
        """One past the last store row of the committed slides."""
        return int(self._run("SELECT MAX(row_start + n_patches) FROM slides")[0][0] or 0)

    def pending(self) -> int:
        """How many slides are embedded but not yet in the search store."""
        return int(self._run("SELECT COUNT(*) FROM slides WHERE row_start IS NULL")[0][0])

    def slide(self, slide_id: int) -> SlideRecord | None:
        rows = self._run(f"SELECT {COLUMNS} FROM slides WHERE id = ?", (slide_id,))
        return SlideRecord(*rows[0]) if rows else None

    def by_path(self, key: str) -> SlideRecord | None:
        rows = self._run(f"SELECT {COLUMNS} FROM slides WHERE path = ?", (key,))
        return SlideRecord(*rows[0]) if rows else None

    def by_name(self, name: str) -> list[SlideRecord]:
        return [
            SlideRecord(*row)
            for row in self._run(
                f"SELECT {COLUMNS} FROM slides WHERE name = ? ORDER BY id", (name,)
            )
        ]

    def add_mark(self, values: Mapping[str, object]) -> int:
        """Store one relevance mark (`MARK_COLUMNS` but `id`); returns its id."""
        names = [c for c in MARK_COLUMNS if c != "id"]
        sql = f"INSERT INTO feedback ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        return self._write([(sql, [values.get(n) for n in names])])[0]

    def marks(self) -> list[dict[str, object]]:
        """Every relevance mark, oldest first."""
        rows = self._run(f"SELECT {', '.join(MARK_COLUMNS)} FROM feedback ORDER BY id")
        return [dict(zip(MARK_COLUMNS, row, strict=True)) for row in rows]

    def salvage_marks(self, damaged: Path) -> int | None:
        """Copy the relevance marks of a damaged catalog file into this one (their ids and
        slide ids kept); how many, or None when that file's marks cannot be read."""
        try:
            with self._lock:
                source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
                try:
                    rows = source.execute(
                        f"SELECT {', '.join(MARK_COLUMNS)} FROM feedback ORDER BY id"
                    ).fetchall()
                finally:
                    source.close()
        except sqlite3.DatabaseError:
            return None
        names, marks = ", ".join(MARK_COLUMNS), ", ".join("?" * len(MARK_COLUMNS))
        sql = f"INSERT OR IGNORE INTO feedback ({names}) VALUES ({marks})"
        self._write([(sql, row) for row in rows])
        return len(rows)

    def next_slide_id(self) -> int:
        """The id the next slide row will get (one writer at a time: see the writer lock)."""
        return int(self._run("SELECT COALESCE(MAX(id), 0) + 1 FROM slides")[0][0])

    def integrity(self) -> str:
        """SQLite's own verdict on the file: 'ok' or what is wrong."""
        return "; ".join(row[0] for row in self._run("PRAGMA integrity_check"))

    def close(self) -> None:
        self._db.close()


def _metadata_statements(
    slide: str, args: tuple[object, ...], values: Mapping[str, str | None]
) -> list[tuple[str, Iterable[object]]]:
    """The statements setting (or, for None, removing) one slide's metadata values; `slide`
    is the SQL that gives its id, from `args`."""
    statements: list[tuple[str, Iterable[object]]] = []
    for name, value in values.items():
        if value is None:
            sql = f"DELETE FROM metadata WHERE slide = {slide} AND name = ?"
            statements.append((sql, (*args, name)))
        else:
            sql = f"INSERT OR REPLACE INTO metadata VALUES ({slide}, ?, ?)"
            statements.append((sql, (*args, name, str(value))))
    return statements
