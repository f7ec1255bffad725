"""The on-disk archive: a folder with

- `catalog.sqlite`: the settings it was built with and one row per slide (or patch group);
- `features/<name>-<hash>.h5`: per slide, `features` (n x d, float16) and `coords` (n x 2,
  level-0 x, y), the layout CLAM and TRIDENT write, plus `paths` for patch groups;
- `reducer.npz`, `index.faiss`, `index_map.npy`: the feature reduction fit on the archive,
  a FAISS inner-product index over the reduced, L2-normalised patches and its row -> slide map.

Each slide's file is written to a temporary name and renamed before its catalog row is
committed, so an interrupted `index` leaves no torn file and resumes with the next slide.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import faiss
import h5py
import numpy as np

from histosearch.archive.reduce import Reducer, load_reducer, make_reducer, save_reducer
from histosearch.errors import HistosearchError
from histosearch.fileio import atomic_path
from histosearch.search.similarity import l2_normalize
from histosearch.slide import open_slide

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
    feature_file TEXT NOT NULL
);
"""
# What an archive is built with; a query must be embedded the same way.
SETTING_KEYS = (
    "encoder",
    "dim",
    "magnification",
    "tile_size",
    "tissue",
    "reduction",
    "n_features",
    "index_metric",
)
# The patch index: inner product of L2-normalised vectors (cosine), or L2 distance of the
# reduced vectors as the LGFFEM paper indexes them.
INDEX_METRICS = ("cosine", "l2")


class ArchiveError(HistosearchError):
    """A missing, empty or incompatible archive."""


def catalog_key(path: str | Path) -> str:
    """How the catalog names a source: the resolved path of a file, else the text as given
    (a manifest group such as `manifest.csv::group=g1`)."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


@dataclass(frozen=True)
class SlideRecord:
    """One catalog row: a slide, or a group of patches standing for one."""

    id: int
    name: str
    path: str
    label: str | None
    patient: str | None
    group: str | None
    mpp: float | None
    n_patches: int
    feature_file: str


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's stored patch embeddings and where they came from."""

    features: np.ndarray
    coords: np.ndarray
    paths: list[str] | None


class Archive:
    """A folder of slides' patch embeddings with a catalog and a vector index."""

    def __init__(self, root: str | Path, settings: dict[str, str] | None = None) -> None:
        """Open the archive at `root`; with `settings`, create it if needed and check them."""
        self.root = Path(root)
        catalog = self.root / "catalog.sqlite"
        if settings is None and not catalog.is_file():
            raise ArchiveError(self.root, "no archive here (build one with histosearch index)")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "features").mkdir(exist_ok=True)
        if settings is not None:
            # Temporary files of a killed run (its atomic writes never renamed): nothing refers
            # to them, and the slides they were for are redone.
            for stale in self.root.rglob(".*.tmp"):
                stale.unlink()
        self._db = sqlite3.connect(catalog)
        self._db.executescript(SCHEMA)
        stored = dict(self._db.execute("SELECT key, value FROM settings"))
        if settings is not None:
            if stored:
                self._check(stored, settings)
            else:
                with self._db:
                    self._db.executemany("INSERT INTO settings VALUES (?, ?)", settings.items())
                stored = dict(settings)
        self.settings = stored
        self._reducer: Reducer | None = None
        self._reducer_loaded = False

    def _check(self, stored: dict[str, str], wanted: dict[str, str]) -> None:
        different = [
            f"{key} {wanted[key]} (archive: {stored.get(key)})"
            for key in SETTING_KEYS
            if key in wanted and stored.get(key) != wanted[key]
        ]
        if different:
            raise ArchiveError(
                self.root, "built with other settings; asked for " + ", ".join(different)
            )

    def check(self, **wanted: object) -> None:
        """Refuse a query embedded differently from the archive."""
        self._check(self.settings, {k: str(v) for k, v in wanted.items()})

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalog ---------------------------------------------------------------------------

    def slides(self) -> list[SlideRecord]:
        """All catalog rows, in the order their features are concatenated."""
        rows = self._db.execute(
            "SELECT id, name, path, label, patient, grp, mpp, n_patches, feature_file "
            "FROM slides ORDER BY id"
        )
        return [SlideRecord(*row) for row in rows]

    def find(self, path: str | Path) -> SlideRecord | None:
        """The record of the slide stored from `path`, if any."""
        key = catalog_key(path)
        return next((s for s in self.slides() if s.path == key), None)

    def add(
        self,
        path: str | Path,
        features: np.ndarray,
        coords: np.ndarray,
        *,
        name: str | None = None,
        label: str | None = None,
        patient: str | None = None,
        group: str | None = None,
        mpp: float | None = None,
        paths: list[str] | None = None,
    ) -> SlideRecord:
        """Store one slide's patch embeddings (written atomically, then catalogued)."""
        key = catalog_key(path)
        name = name or Path(path).name
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        feature_file = f"features/{Path(name).stem}-{digest}.h5"
        with atomic_path(self.root / feature_file) as tmp, h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=np.asarray(features, np.float16))
            h5.create_dataset("coords", data=np.asarray(coords, np.int64))
            if paths is not None:
                h5.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
            h5.attrs.update(
                {"slide": key, **{k: self.settings[k] for k in SETTING_KEYS if k in self.settings}}
            )
        row = (name, key, label, patient, group, mpp, len(features), feature_file)
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO slides (name, path, label, patient, grp, mpp, n_patches, feature_file)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return SlideRecord(cursor.lastrowid, *row)

    def read(self, record: SlideRecord, with_features: bool = True) -> SlideFeatures:
        """A slide's stored features (float32; empty unless `with_features`), coordinates
        and patch paths."""
        with h5py.File(self.root / record.feature_file, "r") as h5:
            paths = [p.decode() for p in h5["paths"][:]] if "paths" in h5 else None
            features = h5["features"][:].astype(np.float32) if with_features else np.empty((0, 0))
            return SlideFeatures(features, h5["coords"][:], paths)

    def patch_image(self, record: SlideRecord, row: int) -> np.ndarray:
        """RGB pixels of one stored patch: its image file, or its tile re-read from the slide."""
        stored = self.read(record, with_features=False)
        if stored.paths is not None:
            with open_slide(stored.paths[row]) as image:
                return image.read_scaled((0, 0), image.dimensions, 1.0)
        tile_size = int(self.settings["tile_size"])
        with open_slide(record.path, mpp=record.mpp) as slide:
            x, y = stored.coords[row]
            return slide.read_region(
                (int(x), int(y)), (tile_size, tile_size), float(self.settings["magnification"])
            )

    def all_features(self) -> tuple[np.ndarray, np.ndarray, list[SlideRecord]]:
        """Every slide's features back to back, their row offsets, and the records."""
        records = self.slides()
        if not records:
            raise ArchiveError(self.root, "the archive is empty")
        blocks = [self.read(r).features for r in records]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blocks])])
        return np.concatenate(blocks), offsets, records

    # -- reduction and vector index --------------------------------------------------------

    def reducer(self) -> Reducer | None:
        """The archive's fitted reduction, or None when it keeps the full features."""
        if not self._reducer_loaded:
            path = self.root / "reducer.npz"
            self._reducer = load_reducer(path) if path.is_file() else None
            self._reducer_loaded = True
        return self._reducer

    def reduce(self, features: np.ndarray, normalise: bool = True) -> np.ndarray:
        """Features as the archive compares them: reduced (if it reduces), L2-normalised."""
        reducer = self.reducer()
        reduced = features if reducer is None else reducer.transform(features)
        return l2_normalize(reduced) if normalise else np.asarray(reduced, np.float32)

    @property
    def index_metric(self) -> str:
        return self.settings.get("index_metric", "cosine")

    def index_vectors(self, features: np.ndarray) -> np.ndarray:
        """Features as the patch index holds them (normalised for cosine, raw for L2)."""
        return self.reduce(features, normalise=self.index_metric == "cosine")

    def build_index(self) -> int:
        """Fit the reduction on all patches, then (re)build the FAISS index; returns its size."""
        features, offsets, records = self.all_features()
        kind, n_features = self.settings.get("reduction", "none"), int(self.settings["n_features"])
        if kind != "none":
            try:
                reducer = make_reducer(kind, n_features).fit(features)
            except ValueError as error:
                raise ArchiveError(self.root, f"cannot fit the {kind} reduction: {error}") from None
            save_reducer(reducer, self.root / "reducer.npz")
            self._reducer, self._reducer_loaded = reducer, True
        reduced = self.index_vectors(features)
        flat = faiss.IndexFlatL2 if self.index_metric == "l2" else faiss.IndexFlatIP
        index = flat(reduced.shape[1])
        index.add(reduced)
        slide_of_row = np.repeat([r.id for r in records], np.diff(offsets))
        row_in_slide = np.arange(len(reduced)) - np.repeat(offsets[:-1], np.diff(offsets))
        with atomic_path(self.root / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        with atomic_path(self.root / "index_map.npy") as tmp, tmp.open("wb") as file:
            np.save(file, np.stack([slide_of_row, row_in_slide], axis=1))
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO settings VALUES ('indexed_patches', ?)",
                (str(len(reduced)),),
            )
        self.settings["indexed_patches"] = str(len(reduced))
        return len(reduced)

    def index(self) -> tuple[faiss.Index, np.ndarray]:
        """The FAISS index and its (slide id, row in slide) map, rebuilt first if stale."""
        total = sum(r.n_patches for r in self.slides())
        if total == 0:
            raise ArchiveError(self.root, "the archive is empty")
        if self.settings.get("indexed_patches") != str(total):
            self.build_index()
        return faiss.read_index(str(self.root / "index.faiss")), np.load(
            self.root / "index_map.npy"
        )

    def describe(self) -> str:
        """One line: what the archive holds and how it was built."""
        records = self.slides()
        settings = json.dumps({k: self.settings.get(k) for k in SETTING_KEYS})
        return f"{len(records)} slides, {sum(r.n_patches for r in records)} patches, {settings}"
