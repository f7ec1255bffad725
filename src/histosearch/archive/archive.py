"""The on-disk archive: a folder with

- `catalog.sqlite`: the settings it was built with and one row per slide (or patch group);
- `features/<name>-<hash>.h5`: per slide, `features` (n x d, float16) and `coords` (n x 2,
  level-0 x, y), the layout CLAM and TRIDENT write, plus `paths` for patch groups: the
  interchange copy of the full features;
- `store/vectors-G.f16`, `store/coords-G.i32`: the searchable (reduced) vectors of every patch,
  memory-mapped by searches and grown by appending (see `store.py`);
- `reducer-G.npz`, `index-G.faiss`, `calibration-G.npz`: the reduction (fit once on the first
  batch, then frozen), the FAISS patch index over the store, and the similarities that turn a
  score into a percentile. G is the catalog's `generation`; `reindex` writes the next one.

A slide's feature file is written to a temporary name and renamed, then its store rows are
appended and flushed, then its catalog row commits: an interrupted run leaves nothing that a
search could read half-done, and the next run (or `check --repair`) finishes the work. One
process writes at a time (a file lock); any number read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from histosearch.archive.catalog import ArchiveError, Catalog, SlideRecord
from histosearch.archive.reduce import REDUCERS, Reducer, load_reducer, make_reducer, save_reducer
from histosearch.archive.store import VectorStore
from histosearch.fileio import atomic_path
from histosearch.slide import open_slide

if TYPE_CHECKING:
    from histosearch.archive.indexer import IndexReport
    from histosearch.encoders import Encoder
    from histosearch.inputs import Item
    from histosearch.search.patch_index import PatchIndex

__all__ = ["Archive", "ArchiveError", "ArchiveSettings", "SlideFeatures", "SlideRecord"]

# The patch index: inner product of L2-normalised vectors (cosine), or L2 distance of the
# reduced vectors as the LGFFEM paper indexes them.
INDEX_METRICS = ("cosine", "l2")
REDUCTIONS = (*REDUCERS, "none")
EDGES = ("drop", "keep")
LOCK = ".writer.lock"
# Percentiles are measured on at most this many slides and patches of the archive.
CALIBRATION_SLIDES = 200
CALIBRATION_PATCHES = 2000


@dataclass(frozen=True)
class ArchiveSettings:
    """What an archive is built with; a query must be embedded the same way."""

    encoder: str = "efficientnet-lite0-imagenet"
    magnification: float = 5.0
    tile_size: int = 224
    tissue: str = "otsu"
    reduction: str = "pca"
    n_features: int = 128
    index_metric: str = "cosine"
    # the partial last row and column of tiles: dropped (the papers' grid) or kept, padded
    edges: str = "drop"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("reduction", self.reduction, REDUCTIONS),
            ("index_metric", self.index_metric, INDEX_METRICS),
            ("edges", self.edges, EDGES),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: choose from {', '.join(choices)}")

    def as_catalog(self) -> dict[str, str]:
        return {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in asdict(self).items()}


# Settings a query or a later `add` must match; `dim` and `weights` are the encoder's own.
MATCHED_KEYS = (*ArchiveSettings.__dataclass_fields__, "dim", "weights")


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's stored full patch embeddings and where they came from."""

    features: np.ndarray
    coords: np.ndarray
    paths: list[str] | None


@dataclass
class Problem:
    """One thing `check` found wrong, and whether `--repair` can mend it."""

    path: str
    reason: str
    repairable: bool
    repaired: bool = False


@dataclass
class SearchView:
    """A consistent snapshot of what searches read: the stored slides in store order and the
    store rows they own (rows past `offsets[-1]` are not committed and never read)."""

    records: list[SlideRecord]
    offsets: np.ndarray
    vectors: np.ndarray
    coords: np.ndarray
    generation: int
    row_slide: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.row_slide = np.repeat(np.arange(len(self.records)), np.diff(self.offsets))


def catalog_key(path: str | Path) -> str:
    """How the catalog names a source: the resolved path of a file, else the text as given
    (a manifest group such as `manifest.csv::group=g1`)."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


class Archive:
    """A folder of slides' patch embeddings with a catalog, a search store and a patch index."""

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
    def open(cls, root: str | Path) -> Archive:
        """An existing archive."""
        return cls(root)

    @classmethod
    def create(
        cls, root: str | Path, settings: ArchiveSettings, encoder: Encoder | None = None
    ) -> Archive:
        """A new archive at `root` built with `settings` (an existing one is opened if it was
        built the same way, and refused otherwise). `encoder` gives its dimension and weights'
        fingerprint; without it the encoder is created to read them."""
        if encoder is None:
            from histosearch.encoders import create_encoder

            encoder = create_encoder(settings.encoder)
        wanted = {**settings.as_catalog(), **encoder_settings(encoder)}
        if settings.reduction == "none":
            wanted["n_features"] = str(encoder.dim)
        return cls(root, _create=wanted)

    def _check(self, stored: dict[str, str], wanted: dict[str, str]) -> None:
        # a key the archive lacks (one built before it was recorded) cannot be checked
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

    def __enter__(self) -> Archive:
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

    def _path(self, stem: str, suffix: str, generation: int | None = None) -> Path:
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

    def find(self, query: str | Path) -> SlideRecord | None:
        """The slide stored from the file `query`, or named `query`, if any."""
        record = self.catalog.by_path(catalog_key(query))
        if record is None:
            named = self.catalog.by_name(str(query))
            record = named[0] if named else None
        return record

    def read(self, record: SlideRecord, with_features: bool = True) -> SlideFeatures:
        """A slide's full stored features (float32; empty unless `with_features`), level-0
        coordinates and patch paths, from its feature file."""
        path = self.root / record.feature_file
        try:
            with h5py.File(path, "r") as h5:
                paths = [p.decode() for p in h5["paths"][:]] if "paths" in h5 else None
                features = (
                    h5["features"][:].astype(np.float32) if with_features else np.empty((0, 0))
                )
                coords = h5["coords"][:]
        except (OSError, KeyError) as error:
            reason = "missing" if not path.exists() else f"unreadable ({error})"
            raise ArchiveError(
                path, f"feature file of {record.name} is {reason}; run histosearch check"
            ) from None
        if len(coords) != record.n_patches:
            raise ArchiveError(
                path,
                f"holds {len(coords)} patches, the catalog {record.n_patches}; "
                "run histosearch check",
            )
        return SlideFeatures(features, coords, paths)

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
        settings = json.dumps({k: self.settings.get(k) for k in MATCHED_KEYS if k != "weights"})
        return (
            f"{len(records)} slides, {sum(r.n_patches for r in records)} patches"
            + (f" ({pending} not yet searchable)" if pending else "")
            + f", {settings}"
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
        (self.root / ".writer.pid").write_text(str(os.getpid()))
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

    def add(
        self,
        inputs: Sequence[str | Path | Item],
        *,
        group_by: str | None = None,
        encoder: Encoder | None = None,
        weights: str | Path | None = None,
        mpp: float | None = None,
        objective_power: float | None = None,
        batch_size: int = 32,
        workers: int = 1,
        on_progress: Callable[[str, int, int | None], None] | None = None,
        ray: bool | str = False,
    ) -> IndexReport:
        """Embed and store the slides, folders of slides and manifests in `inputs` (or items
        collected from them) that the archive does not hold yet; failures are collected in the
        report, not raised.

        `on_progress(stage, done, total)` is called as slides ("slides") and patches
        ("patches") are done. `ray` spreads the embedding over Ray workers: True starts a
        local Ray instance, a string is a cluster's address; this process commits the rows.
        """
        from histosearch.archive.indexer import index_items
        from histosearch.inputs import Item, collect_items

        # an input that gives nothing (a refused manifest, a folder of no slides) is reported
        # with the failures and the others go on; items collected already are taken as given
        unreadable: list[tuple[str, str]] = []
        items = [i for i in inputs if isinstance(i, Item)] + collect_items(
            [Path(p) for p in inputs if not isinstance(p, Item)], group_by, unreadable
        )
        if encoder is None:
            from histosearch.embed import default_device
            from histosearch.encoders import create_encoder

            encoder = create_encoder(self.settings["encoder"], weights).to(default_device())
        self.check_encoder(encoder)
        with self.writing():
            report = index_items(
                self,
                items,
                encoder,
                mpp=mpp,
                objective_power=objective_power,
                batch_size=batch_size,
                num_workers=workers,
                on_progress=on_progress,
                ray=ray,
                weights=weights,
            )
            report.failures[:0] = unreadable
            self.sync()
        return report

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
    ) -> SlideRecord:
        """Store one slide: its feature file, then (once the reduction is fitted) its store
        rows, then its catalog row. Call inside `writing()`."""
        if not self._lock_depth:
            raise RuntimeError("store_slide needs the writer lock (Archive.writing)")
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        feature_file = f"features/{Path(name).stem}-{digest}.h5"
        target = self.root / feature_file
        try:
            with atomic_path(target) as tmp, h5py.File(tmp, "w") as h5:
                h5.create_dataset("features", data=np.asarray(features, np.float16))
                h5.create_dataset("coords", data=np.asarray(coords, np.int64))
                if paths is not None:
                    h5.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
                # enough to rebuild the catalog from the feature files (check --repair)
                metadata = {
                    "name": name,
                    "label": label,
                    "patient": patient,
                    "group": group,
                    "mpp": mpp,
                    "tile_l0": tile_l0,
                }
                h5.attrs.update(
                    {
                        "slide": key,
                        **{k: v for k, v in metadata.items() if v is not None},
                        **{k: self.settings[k] for k in MATCHED_KEYS if k in self.settings},
                    }
                )
        except OSError as error:  # disk full, read-only folder
            raise ArchiveError(target, f"cannot write the feature file: {error}") from None
        row = (name, key, label, patient, group, mpp, len(features), feature_file, tile_l0)
        try:
            row_start = self._append_to_store(features, coords)
            (slide_id,) = self.catalog.write(
                [
                    (
                        "INSERT INTO slides (name, path, label, patient, grp, mpp, n_patches,"
                        " feature_file, tile_l0, row_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*row, row_start),
                    )
                ]
            )
        except (ArchiveError, OSError) as error:
            target.unlink(missing_ok=True)  # no orphan feature file
            if isinstance(error, ArchiveError):
                raise
            raise ArchiveError(self.root, f"cannot write the search store: {error}") from None
        return SlideRecord(slide_id, *row, row_start)

    def _stored_end(self) -> int:
        return self.catalog.stored_end()

    def _append_to_store(self, features: np.ndarray, coords: np.ndarray) -> int | None:
        """Append a slide's reduced vectors to the store; None while no reduction is fitted
        yet (the first batch), in which case `sync` stores the slide later."""
        reducer = self.reducer()
        if reducer is None and self.settings["reduction"] != "none":
            return None
        start = self._stored_end()
        store = VectorStore(self.root, self.generation, self.dim)
        store.append(start, self._searchable(features, reducer), coords)
        return start

    @staticmethod
    def _searchable(features: np.ndarray, reducer: Reducer | None) -> np.ndarray:
        return np.asarray(
            features if reducer is None else reducer.transform(np.asarray(features, np.float32)),
            np.float32,
        )

    def sync(self) -> None:
        """Finish what an add left: fit the reduction if there is none yet, store the slides
        not yet in the search store, bring the patch index and the calibration up to date."""
        with self.writing():
            pending = self.pending()
            if pending and self.reducer() is None and self.settings["reduction"] != "none":
                blocks = [self.read(r).features for r in pending]
                self._fit_reducer(np.concatenate(blocks), self.generation)
            for record in pending:
                stored = self.read(record)
                start = self._append_to_store(stored.features, stored.coords)
                self.catalog.write(
                    [("UPDATE slides SET row_start = ? WHERE id = ?", (start, record.id))]
                )
            view = self.view()
            if len(view.records):
                index = self._update_index(view)
                if self.calibration()["rows"] != len(view.vectors):  # grown since measured
                    self._calibrate(view, index)

    def _fit_reducer(self, features: np.ndarray, generation: int) -> Reducer:
        kind = self.settings["reduction"]
        try:
            reducer = make_reducer(kind, self.dim).fit(features)
        except ValueError as error:
            raise ArchiveError(self.root, f"cannot fit the {kind} reduction: {error}") from None
        save_reducer(reducer, self._path("reducer", ".npz", generation))
        self._reducer = (generation, reducer)
        return reducer

    def reindex(self, on_progress: Callable[[str, int, int | None], None] | None = None) -> None:
        """Refit the reduction on every slide's full features and rebuild the store, the index
        and the calibration as a new generation; searches see the switch at once."""
        with self.writing():
            records = self.slides()
            if not records:
                raise ArchiveError(self.root, "the archive is empty")
            old, new = self.generation, self.generation + 1
            reducer = None
            if self.settings["reduction"] != "none":
                features, _, _ = self.all_features()
                reducer = self._fit_reducer(features, new)
                del features
            store = VectorStore(self.root, new, self.dim)
            store.remove()
            start, updates = 0, []
            for done, record in enumerate(records):
                stored = self.read(record)
                store.append(start, self._searchable(stored.features, reducer), stored.coords)
                updates.append(("UPDATE slides SET row_start = ? WHERE id = ?", (start, record.id)))
                start += record.n_patches
                if on_progress is not None:
                    on_progress("slides", done + 1, len(records))
            updates.append(("UPDATE settings SET value = ? WHERE key = 'generation'", (str(new),)))
            self.catalog.write(updates)
            self.settings = self.catalog.settings()
            self._reducer = (new, reducer)
            view = self.view()
            self._calibrate(view, self._update_index(view))
            for stale in (
                self._path("reducer", ".npz", old),
                self._path("index", ".faiss", old),
                self._path("calibration", ".npz", old),
            ):
                stale.unlink(missing_ok=True)
            VectorStore(self.root, old, self.dim).remove()

    # -- what searches read ----------------------------------------------------------------

    def reducer(self) -> Reducer | None:
        """The archive's fitted reduction (None when it keeps the full features, or before
        its first batch is stored)."""
        if self._reducer is not None and self._reducer[0] == self.generation:
            return self._reducer[1]
        path = self._path("reducer", ".npz")
        reducer = None
        if path.is_file():
            try:
                reducer = load_reducer(path)
            except Exception as error:  # numpy's pickle/zip errors name no file
                raise ArchiveError(
                    path, f"unreadable reduction ({type(error).__name__}); run histosearch check"
                ) from None
        elif self.settings["reduction"] != "none" and self._stored_end():
            raise ArchiveError(path, "the reduction is missing; run histosearch check --repair")
        self._reducer = (self.generation, reducer)
        return reducer

    def reduce(self, features: np.ndarray) -> np.ndarray:
        """Full features as the store holds them (reduced if the archive reduces), float32."""
        return self._searchable(features, self.reducer())

    def view(self) -> SearchView:
        """What searches see now: the slides committed to the store, and the store itself."""
        self.settings = self.catalog.settings()
        records = self.catalog.slides(stored_only=True)
        offsets = np.array([0] + [r.row_start + r.n_patches for r in records], np.int64)
        starts = np.array([r.row_start for r in records], np.int64)
        if len(records) and not np.array_equal(starts, offsets[:-1]):
            raise ArchiveError(
                self.catalog.path, "store rows of the catalog overlap or leave gaps; run check"
            )
        vectors, coords = VectorStore(self.root, self.generation, self.dim).open(int(offsets[-1]))
        return SearchView(records, offsets, vectors, coords, self.generation)

    def pending(self) -> list[SlideRecord]:
        """Slides embedded but not yet in the search store (an unfinished add)."""
        return [r for r in self.slides() if r.row_start is None]

    def _update_index(self, view: SearchView) -> PatchIndex:
        """Append the store rows the patch index lacks (or build it, its FAISS type chosen by
        the archive's size), save it, and return it."""
        from histosearch.search.patch_index import PatchIndex

        path = self._path("index", ".faiss", view.generation)
        index = self._load_index(path) if path.is_file() else None
        if index is not None and index.ntotal > len(view.vectors):
            index = None  # built over rows that were never committed: rebuild
        if index is None:
            index = PatchIndex.build(view.vectors, self.index_metric)
        elif index.ntotal < len(view.vectors):
            index.add(view.vectors[index.ntotal :])
        else:
            return index
        index.save(path)
        return index

    @staticmethod
    def _load_index(path: Path) -> PatchIndex:
        from histosearch.search.patch_index import PatchIndex

        try:
            return PatchIndex.load(path)
        except RuntimeError as error:
            raise ArchiveError(
                path,
                f"unreadable patch index ({str(error).splitlines()[0][:80]}); "
                "run histosearch check --repair",
            ) from None

    def patch_index(self, view: SearchView) -> PatchIndex:
        """The patch index over exactly the view's rows (rows committed since it was saved are
        added in memory; the next writer saves them)."""
        path = self._path("index", ".faiss", view.generation)
        if not path.is_file():
            raise ArchiveError(path, "the patch index is missing; run histosearch check --repair")
        index = self._load_index(path)
        if index.ntotal > len(view.vectors):
            raise ArchiveError(
                path,
                f"the patch index holds {index.ntotal} rows, the catalog {len(view.vectors)}; "
                "run histosearch check --repair",
            )
        if index.metric != self.index_metric:
            raise ArchiveError(path, "the patch index has the wrong metric; run check --repair")
        index.add(view.vectors[index.ntotal :])
        return index

    def _calibrate(self, view: SearchView, index: PatchIndex) -> None:
        """Measure the archive's own nearest-neighbour similarities (slides and patches),
        against which search results are given as percentiles."""
        from histosearch.search.calibration import measure_calibration

        patch_nn, slide_nn = measure_calibration(
            view, index, CALIBRATION_SLIDES, CALIBRATION_PATCHES
        )
        target = self._path("calibration", ".npz", view.generation)
        with atomic_path(target) as tmp, tmp.open("wb") as file:
            np.savez(file, patches=patch_nn, slides=slide_nn, rows=len(view.vectors))

    def calibration(self) -> dict[str, np.ndarray]:
        """Sorted nearest-neighbour similarities of the archive's patches and slides, and the
        store rows they were measured on (empty arrays and -1 when not measured yet)."""
        path = self._path("calibration", ".npz")
        try:
            with np.load(path) as data:
                return {k: data[k] for k in ("patches", "slides", "rows")}
        except Exception:  # a missing or damaged calibration only loses the percentiles
            return {"patches": np.empty(0), "slides": np.empty(0), "rows": np.array(-1)}

    # -- checking --------------------------------------------------------------------------

    def check(self, repair: bool = False) -> list[Problem]:
        """Verify every part of the archive; with `repair`, rebuild what can be derived
        (store, reduction, index, calibration) and drop slides whose feature file is lost."""
        problems: list[Problem] = []
        integrity = self.catalog.integrity()
        if integrity != "ok":
            problems.append(Problem(str(self.catalog.path), integrity, False))
            return problems
        lost = []
        for record in self.slides():
            try:
                self.read(record, with_features=False)
            except ArchiveError as error:
                lost.append(record)
                problems.append(
                    Problem(
                        error.path or record.feature_file,
                        f"{error.reason}: re-index {record.path}",
                        True,
                    )
                )
        derived_ok = True
        try:
            self.reducer()
            view = self.view()
            if pending := len(self.pending()):
                problems.append(
                    Problem(
                        str(self.catalog.path), f"{pending} slides not in the search store", True
                    )
                )
                derived_ok = False
            if len(view.records):
                self.patch_index(view)
        except ArchiveError as error:
            problems.append(Problem(error.path or str(self.root), error.reason, True))
            derived_ok = False
        if repair and problems:
            with self.writing():
                if lost:
                    self.catalog.write([("DELETE FROM slides WHERE id = ?", (r.id,)) for r in lost])
                if (lost or not derived_ok) and self.slides():
                    self.reindex()
            for problem in problems:
                problem.repaired = True
        return problems


def encoder_settings(encoder: Encoder) -> dict[str, str]:
    """What of the encoder an archive records: its output size and its weights' fingerprint."""
    return {"dim": str(encoder.dim), "weights": encoder.fingerprint}


def check_archive(root: str | Path, repair: bool = False) -> tuple[list[Problem], str]:
    """`Archive.check` that also meets a catalog too damaged to open: with `repair`, the
    catalog is rebuilt from the feature files (the damaged one is kept beside it). Returns the
    problems and a description of the archive as it is afterwards."""
    root = Path(root)
    problems = []
    try:
        archive = Archive.open(root)
    except ArchiveError as error:
        if not (root / "features").is_dir():
            raise
        problems.append(Problem(error.path or str(root), error.reason, True))
        if not repair:
            return problems, "catalog unreadable"
        archive = rebuild_catalog(root)
        problems[0].repaired = True
    with archive:
        problems += archive.check(repair=repair)
        return problems, archive.describe()


def rebuild_catalog(root: Path) -> Archive:
    """A new catalog from the settings and slide metadata every feature file carries; the
    damaged catalog is renamed, never deleted. The store is rebuilt (`reindex`)."""
    files = sorted((root / "features").glob("*.h5"))
    entries = []
    for path in files:
        try:
            with h5py.File(path, "r") as h5:
                attrs = {k: v.item() if hasattr(v, "item") else v for k, v in h5.attrs.items()}
                entries.append((path, attrs, len(h5["coords"])))
        except (OSError, KeyError):
            continue  # unreadable: that slide is lost and must be indexed again
    if not entries:
        raise ArchiveError(root, "no readable feature file to rebuild the catalog from")
    settings = {k: str(entries[0][1][k]) for k in MATCHED_KEYS if k in entries[0][1]}
    catalog = root / "catalog.sqlite"
    for suffix in ("", "-wal", "-shm"):
        damaged = catalog.with_name(catalog.name + suffix)
        if damaged.exists():
            damaged.rename(damaged.with_name(damaged.name + ".damaged"))
    archive = Archive(root, _create=settings)
    with archive.writing():
        for derived in (*root.glob("store/*"), *root.glob("*-[0-9]*.npz"), *root.glob("*.faiss")):
            derived.unlink()
        archive.catalog.write(
            [
                (
                    "INSERT OR IGNORE INTO slides (name, path, label, patient, grp, mpp, n_patches,"
                    " feature_file, tile_l0) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        attrs.get("name", path.stem),
                        attrs["slide"],
                        attrs.get("label"),
                        attrs.get("patient"),
                        attrs.get("group"),
                        attrs.get("mpp"),
                        n_patches,
                        path.relative_to(root).as_posix(),
                        attrs.get("tile_l0"),
                    ),
                )
                for path, attrs, n_patches in entries
            ]
        )
        archive.reindex()
    return archive
