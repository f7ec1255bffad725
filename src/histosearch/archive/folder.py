"""The archive folder and what every part of histosearch reads or writes in it:

- `catalog.sqlite`: the settings it was built with, one row per slide (or patch group) and the
  relevance marks (`catalog.py`, the only module that opens it);
- `features/<name>-<hash>.h5`: per slide, the full features and coordinates, the interchange
  copy (`feature_files.py`);
- `store/vectors-G.f16`, `store/coords-G.i32`: the searchable (reduced) vectors of every patch,
  memory-mapped by searches and grown by appending (`store.py`);
- `reducer-G.npz` (`reduce.py`), and the files the search layer derives from the store (its
  patch index and calibration, kept up to date through `upkeep.py`). G is the catalog's
  `generation`; `reindex` writes the next one.

A slide's feature file is written to a temporary name and renamed, then its store rows are
appended and flushed, then its catalog row commits: an interrupted run leaves nothing that a
search could read half-done, and the next run (or `check --repair`) finishes the work. One
process writes at a time (a file lock); any number read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Self

import numpy as np

from histosearch.archive.catalog import ArchiveError, Catalog, SlideRecord
from histosearch.archive.checksums import file_checksum, mismatch, write_checksummed
from histosearch.archive.feature_files import (
    METADATA_ATTR,
    SlideFeatures,
    metadata_attr,
    read_feature_file,
    write_feature_file,
)
from histosearch.archive.metadata import Metadata
from histosearch.archive.reduce import Reducer, load_reducer, make_reducer, save_reducer
from histosearch.archive.settings import MATCHED_KEYS, ArchiveSettings, encoder_settings
from histosearch.archive.store import VectorStore
from histosearch.archive.view import SearchView
from histosearch.fileio import atomic_path
from histosearch.inputs import catalog_key
from histosearch.slide import open_slide
from histosearch.tiling import Tiling

if TYPE_CHECKING:
    from histosearch.encoders import Encoder

LOCK = ".writer.lock"
# What an archive built before a setting was recorded was built with.
BEFORE_RECORDED = {"mosaic": "all"}
FILE_STEM_BYTES = 120


class ArchiveFolder:
    """An archive folder: its catalog, feature files, search store and reduction, the writer
    lock, and the snapshot searches read (`view`). `Archive` adds adding, upkeep and checks."""

    # The lowest id a new slide may get: a shard of a sharded archive starts where the shard
    # before it ended, so that ids stay unique across the shards.
    first_id = 1

    def __init__(self, root: str | Path, *, _create: dict[str, str] | None = None) -> None:
        """Open the archive at `root` (use `Archive.open` / `Archive.create`)."""
        self.root = Path(root)
        if _create is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.root, create=_create is not None)
        stored = self.catalog.settings()
        if _create is not None and not stored:
            self.catalog.set({**_create, "generation": "0"})
            stored = self.catalog.settings()
        elif _create is not None and not self.catalog.slides():
            # an archive takes its settings with its first stored slide: a first run that
            # stored none locks nothing
            self.catalog.set(_create)
            stored = self.catalog.settings()
        elif _create is not None:
            self._check(stored, _create)
        if "encoder" not in stored or "dim" not in stored:
            raise ArchiveError(
                self.catalog.path,
                "the catalog has no settings (damaged, or not an archive); "
                "run histosearch check --archive DIR",
            )
        self.settings = stored
        self._lock_depth = 0
        self._lock: object | None = None
        self._reducer: tuple[int, Reducer | None] | None = None

    @classmethod
    def open(cls, root: str | Path) -> Self:
        """An existing archive."""
        return cls(root)

    @classmethod
    def create(
        cls, root: str | Path, settings: ArchiveSettings, encoder: Encoder | None = None
    ) -> Self:
        """A new archive at `root` built with `settings` (an existing one is opened if it was
        built the same way, and refused otherwise). `encoder` gives its dimension and weights'
        fingerprint; without it the encoder is created to read them."""
        return cls(root, _create=catalog_settings(settings, encoder))

    def _check(self, stored: dict[str, str], wanted: dict[str, str]) -> None:
        # a key the archive lacks was recorded after it was built: it has the key's old
        # meaning where there is one (every tile before mosaics), else it cannot be checked
        stored = {**BEFORE_RECORDED, **stored}
        different = [
            f"{key} {wanted[key]} (archive: {stored[key]})"
            for key in MATCHED_KEYS
            if key in wanted and key in stored and stored[key] != wanted[key]
        ]
        if different:
            raise ArchiveError(
                self.root, "built with other settings; asked for " + ", ".join(different)
            )

    def check_encoder(self, encoder: Encoder) -> None:
        """Refuse an encoder (or weights) other than the one the archive was built with."""
        self._check(self.settings, {"encoder": encoder.name, **encoder_settings(encoder)})

    def check_settings(self, **wanted: object) -> None:
        """Refuse a query asking for settings other than the archive's."""
        self._check(self.settings, {k: str(v) for k, v in wanted.items()})

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def generation(self) -> int:
        return int(self.settings.get("generation", "0"))

    @property
    def dim(self) -> int:
        """Size of the searchable vectors."""
        return int(self.settings["n_features"])

    @property
    def index_metric(self) -> str:
        return self.settings.get("index_metric", "cosine")

    @property
    def tiling(self) -> Tiling:
        """How the archive cuts slides into tiles."""
        return Tiling.of(self.settings)

    def path(self, stem: str, suffix: str, generation: int | None = None) -> Path:
        """The file `stem-G.suffix` of store generation G (the current one by default)."""
        return self.root / f"{stem}-{self.generation if generation is None else generation}{suffix}"

    # -- catalog ---------------------------------------------------------------------------

    def slides(self) -> list[SlideRecord]:
        """All catalog rows, by id."""
        return self.catalog.slides()

    def get(self, slide_id: int) -> SlideRecord:
        """The slide with catalog id `slide_id`."""
        record = self.catalog.slide(int(slide_id))
        if record is None:
            raise ArchiveError(self.root, f"no slide with id {slide_id}")
        return record

    def metadata(self) -> Metadata:
        """Every slide's metadata beyond the built-in columns, typed by column."""
        return Metadata.of(self.catalog.metadata())

    def find(self, query: str | Path) -> SlideRecord | None:
        """The slide stored from the file `query`, or named `query`, if any."""
        record = self.catalog.by_path(catalog_key(query))
        if record is None:
            named = self.catalog.by_name(str(query))
            record = named[0] if named else None
        return record

    def read(self, record: SlideRecord, with_features: bool = True) -> SlideFeatures:
        """A slide's full stored features (float32; empty unless `with_features`), level-0
        coordinates and patch paths, from its feature file, which must be that slide's (and,
        when the features are read, the bytes whose checksum the catalog recorded)."""
        path = self.root / record.feature_file
        stored = read_feature_file(path, record.name, with_features, record.features_crc)
        if stored.slide is not None and stored.slide != record.path:
            raise ArchiveError(
                path,
                f"the feature file of {record.name} holds another slide ({stored.slide}); "
                "run histosearch check --archive DIR --repair",
            )
        if len(stored.coords) != record.n_patches:
            raise ArchiveError(
                path,
                f"holds {len(stored.coords)} patches, the catalog {record.n_patches}; "
                "run histosearch check",
            )
        return stored

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
        """Every slide's full features back to back (from the feature files), their row
        offsets, and the records."""
        records = self.slides()
        if not records:
            raise ArchiveError(self.root, "the archive is empty")
        blocks = [self.read(r).features for r in records]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blocks])])
        return np.concatenate(blocks), offsets, records

    def describe(self) -> str:
        """One line: what the archive holds and how it was built."""
        records = self.slides()
        pending = sum(r.row_start is None for r in records)
        return (
            f"{len(records)} slides, {sum(r.n_patches for r in records)} patches"
            + (f" ({pending} not yet searchable)" if pending else "")
            + f"; {describe_settings(self.settings)}"
        )

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the archive's writer lock: a second writer stops with the first one's pid."""
        from filelock import FileLock, Timeout

        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        lock = FileLock(self.root / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = (
                (self.root / ".writer.pid").read_text().strip()
                if (self.root / ".writer.pid").is_file()
                else "?"
            )
            raise ArchiveError(
                self.root, f"archive is being written by process {holder}; try again when it ends"
            ) from None
        except OSError as error:  # a read-only folder or disk, or one not ours
            raise ArchiveError(
                self.root, f"cannot write to the archive ({error.strerror or error})"
            ) from None
        try:
            (self.root / ".writer.pid").write_text(str(os.getpid()))
        except OSError as error:
            lock.release()
            raise ArchiveError(
                self.root, f"cannot write to the archive ({error.strerror or error})"
            ) from None
        self._lock_depth = 1
        try:
            self.settings = self.catalog.settings()
            # Temporary files of a killed writer: nothing refers to them, and their work is
            # redone. Only a lock holder removes them, so no live writer's file is touched.
            for stale in self.root.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            self._lock_depth = 0
            (self.root / ".writer.pid").unlink(missing_ok=True)
            lock.release()

    def store_slide(
        self,
        key: str,
        features: np.ndarray,
        coords: np.ndarray,
        *,
        name: str,
        label: str | None = None,
        patient: str | None = None,
        group: str | None = None,
        mpp: float | None = None,
        tile_l0: float | None = None,
        paths: list[str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> SlideRecord:
        """Store one slide: its feature file, then (once the reduction is fitted) its store
        rows, then its catalog row and its `metadata` (column: text value). Call inside
        `writing()`."""
        if not self._lock_depth:
            raise RuntimeError("store_slide needs the writer lock (Archive.writing)")
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        # the digest keeps names apart: the stem is cut to stay within a file name's 255 bytes
        stem = Path(name).stem.encode()[:FILE_STEM_BYTES].decode(errors="ignore")
        feature_file = f"features/{stem}-{digest}.h5"
        target = self.root / feature_file
        # enough to rebuild the catalog from the feature files, ids kept (check --repair)
        slide_id = max(self.catalog.next_slide_id(), self.first_id)
        attrs = {
            "id": slide_id,
            "slide": key,
            "name": name,
            "label": label,
            "patient": patient,
            "group": group,
            "mpp": mpp,
            "tile_l0": tile_l0,
            METADATA_ATTR: metadata_attr(metadata or {}),
        }
        settings = {k: self.settings[k] for k in MATCHED_KEYS if k in self.settings}
        features_crc = write_feature_file(target, features, coords, paths, {**attrs, **settings})
        row = {
            "id": slide_id,
            "name": name,
            "path": key,
            "label": label,
            "patient": patient,
            "grp": group,
            "mpp": mpp,
            "n_patches": len(features),
            "feature_file": feature_file,
            "tile_l0": tile_l0,
            "features_crc": features_crc,
        }
        try:
            row_start, store_crc = self.append_to_store(features, coords)
            stored = {**row, "row_start": row_start, "store_crc": store_crc, "metadata": metadata}
            self.catalog.add_slides([stored])
        except (ArchiveError, OSError) as error:
            target.unlink(missing_ok=True)  # no orphan feature file
            if isinstance(error, ArchiveError):
                raise
            raise ArchiveError(self.root, f"cannot write the search store: {error}") from None
        return self.get(slide_id)

    def append_to_store(
        self, features: np.ndarray, coords: np.ndarray
    ) -> tuple[int | None, int | None]:
        """Append a slide's reduced vectors to the store: (its first row, its rows'
        checksum); (None, None) while no reduction is fitted yet (the first batch), in which
        case `sync` stores the slide later."""
        reducer = self.reducer()
        if reducer is None and self.settings["reduction"] != "none":
            return None, None
        start = self.catalog.stored_end()
        store = VectorStore(self.root, self.generation, self.dim)
        return start, store.append(start, searchable(features, reducer), coords)

    def fit_reducer(self, features: np.ndarray, generation: int) -> Reducer:
        kind = self.settings["reduction"]
        try:
            reducer = make_reducer(kind, self.dim).fit(features)
        except ValueError as error:
            raise ArchiveError(self.root, f"cannot fit the {kind} reduction: {error}") from None
        path = self.path("reducer", ".npz", generation)
        self.write_derived(path, lambda file: save_reducer(reducer, file))
        self._reducer = (generation, reducer)
        return reducer

    # -- the derived files, checksummed whole ---------------------------------------------

    def write_derived(
        self, path: Path, write: Callable[[BinaryIO], None], covers: int | None = None
    ) -> None:
        """Write a derived file (reduction, patch index, sketches, calibration) atomically by
        `write(file)` and record its checksum, and `covers` (how much of the store it was
        derived from, store rows or slides: `derived_covers`) when given. Until the rename,
        readers may still meet the file it replaces, so its checksum is kept beside the new
        one until then."""
        key = f"checksum:{path.name}"
        with atomic_path(path) as tmp:
            crc = str(write_checksummed(tmp, write))
            before = self.catalog.settings().get(key, "").split()[:1]
            self.catalog.set({key: " ".join([crc, *before])})
        # recorded after the rename: a crash between leaves a smaller count, never a larger
        covered = {} if covers is None else {f"covers:{path.name}": str(covers)}
        self.catalog.set({key: crc} | covered)

    def derived_covers(self, path: Path) -> int | None:
        """What `write_derived` recorded that the file at `path` covers (None when nothing
        was recorded or the file is gone)."""
        value = self.catalog.settings().get(f"covers:{path.name}")
        return int(value) if value is not None and path.is_file() else None

    @contextlib.contextmanager
    def open_derived(self, path: Path, what: str) -> Iterator[BinaryIO]:
        """A derived file open for reading, refused when its bytes match no checksum recorded
        for it (a file written before checksums were recorded has none, and passes). The
        bytes checked are those read: the open file, never the path again."""
        key = f"checksum:{path.name}"
        for _ in range(3):
            try:
                file = path.open("rb")
            except FileNotFoundError:
                raise ArchiveError(
                    path, f"the {what} is missing; run histosearch check --archive DIR --repair"
                ) from None
            with file:
                crc = str(file_checksum(file))
                recorded = self.catalog.settings().get(key)
                if recorded is None or crc in recorded.split():
                    file.seek(0)
                    yield file
                    return
                inode = os.fstat(file.fileno()).st_ino
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_ino == inode:  # not replaced by a writer meanwhile
                    break
        raise mismatch(path, f"the bytes of the {what}")

    def forget_derived(self, path: Path) -> None:
        """Remove a derived file and its recorded checksum."""
        path.unlink(missing_ok=True)
        self.catalog.unset([f"checksum:{path.name}", f"covers:{path.name}"])

    # -- what searches read ----------------------------------------------------------------

    def reducer(self, generation: int | None = None) -> Reducer | None:
        """The fitted reduction of store generation `generation` (the current one by default);
        None when the archive keeps the full features, or before its first batch is stored."""
        generation = self.generation if generation is None else generation
        if self._reducer is not None and self._reducer[0] == generation:
            return self._reducer[1]
        path = self.path("reducer", ".npz", generation)
        reducer = None
        if path.is_file():
            with self.open_derived(path, "reduction") as file:
                try:
                    reducer = load_reducer(file)
                except Exception as error:  # numpy's pickle/zip errors name no file
                    raise ArchiveError(
                        path,
                        f"unreadable reduction ({type(error).__name__}); run histosearch check",
                    ) from None
        elif self.settings["reduction"] != "none" and self.catalog.stored_end():
            raise ArchiveError(path, "the reduction is missing; run histosearch check --repair")
        self._reducer = (generation, reducer)
        return reducer

    def reduce(self, features: np.ndarray) -> np.ndarray:
        """Full features as the store holds them (reduced if the archive reduces), float32."""
        return searchable(features, self.reducer())

    def view(self) -> SearchView:
        """What searches see now: the slides committed to the store, and the store itself."""
        self.settings, records = self.catalog.stored_snapshot()
        return self.view_of(records, self.generation)

    def view_of(self, records: list[SlideRecord], generation: int) -> SearchView:
        """The view of store generation `generation` holding `records` (in store order)."""
        offsets = np.array([0] + [r.row_start + r.n_patches for r in records], np.int64)
        starts = np.array([r.row_start for r in records], np.int64)
        if len(records) and not np.array_equal(starts, offsets[:-1]):
            raise ArchiveError(
                self.catalog.path, "store rows of the catalog overlap or leave gaps; run check"
            )
        vectors, coords = VectorStore(self.root, generation, self.dim).open(int(offsets[-1]))
        return SearchView(records, offsets, vectors, coords, generation)

    def pending(self) -> list[SlideRecord]:
        """Slides embedded but not yet in the search store (an unfinished add)."""
        return [r for r in self.slides() if r.row_start is None]


def catalog_settings(settings: ArchiveSettings, encoder: Encoder | None = None) -> dict[str, str]:
    """What the catalog of an archive built with `settings` records: them and the encoder's
    dimension and weights' fingerprint (`encoder` is created to read them when not given)."""
    if encoder is None:
        from histosearch.encoders import create_encoder

        encoder = create_encoder(settings.encoder)
    wanted = {**settings.as_catalog(), **encoder_settings(encoder)}
    if settings.reduction == "none":
        wanted["n_features"] = str(encoder.dim)
    return wanted


def describe_settings(s: Mapping[str, str]) -> str:
    """How an archive was built, in words, from its catalog settings."""
    reduced = (
        "unreduced"
        if s.get("reduction") == "none"
        else f"{s.get('reduction')} to {s.get('n_features')}"
    )
    return (
        f"{s.get('encoder')} ({s.get('dim')}-d, {reduced}) on {s.get('tile_size')} px "
        f"tiles at {s.get('magnification')}x, {s.get('tissue')} tissue, "
        f"{s.get('index_metric')} index"
    )


def searchable(features: np.ndarray, reducer: Reducer | None) -> np.ndarray:
    """Full features as a store with `reducer` holds them, float32."""
    return np.asarray(
        features if reducer is None else reducer.transform(np.asarray(features, np.float32)),
        np.float32,
    )
