"""A sharded archive: a folder holding `shards.json` and N ordinary archive folders (shards),
each with its own catalog, feature files, store and derived files, all built with the same
settings and the same reduction.

- `shards.json`: the settings, the shard folders in order, the id each shard's slides start
  at, the most slides a shard takes, and the checksum of `reducer.npz`;
- `reducer.npz`: the one reduction every shard's store is written with (fitted on the first
  shard's first slides; a shard, `reindex` and `check --repair` included, never fits its own),
  so a slide has the same searchable vectors whichever shard holds it;
- `shard-000/`, `shard-001/`, ...: archives (`Archive`). A slide is never split; new slides go
  to the newest shard until it holds `max_slides`, then to a new one. Slide ids are unique
  across the shards: a shard's start where the one before it ended (only the newest shard
  grows).
"""

from __future__ import annotations

import contextlib
import io
import json
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np

from histosearch.archive.archive import Archive, inputs_to_add
from histosearch.archive.catalog import CATALOG, ArchiveError, SlideRecord
from histosearch.archive.feature_files import SlideFeatures
from histosearch.archive.folder import LOCK, catalog_settings, describe_settings
from histosearch.archive.metadata import Metadata, annotations
from histosearch.archive.reduce import Reducer, load_reducer, save_reducer
from histosearch.archive.repair import Problem, check_archive
from histosearch.archive.settings import MATCHED_KEYS, ArchiveSettings
from histosearch.embed.options import DEFAULT_OPTIONS, EmbedOptions
from histosearch.fileio import atomic_path
from histosearch.inputs import Item, catalog_key
from histosearch.tiling import Tiling

if TYPE_CHECKING:
    from histosearch.archive.adding import IndexReport
    from histosearch.archive.catalog import Catalog
    from histosearch.encoders import Encoder

MANIFEST = "shards.json"
SHARED_REDUCER = "reducer.npz"


def is_sharded(root: str | Path) -> bool:
    """Whether `root` is a sharded archive (holds `shards.json`)."""
    return (Path(root) / MANIFEST).is_file()


def open_archive(root: str | Path) -> Archive | ShardedArchive:
    """The archive at `root`, plain or sharded."""
    return ShardedArchive(root) if is_sharded(root) else Archive.open(root)


def create_archive(
    root: str | Path,
    settings: ArchiveSettings,
    encoder: Encoder | None = None,
    max_shard_slides: int | None = None,
) -> Archive | ShardedArchive:
    """`Archive.create`, or `ShardedArchive.create` when `max_shard_slides` is given or `root`
    is sharded already."""
    if max_shard_slides is not None or is_sharded(root):
        return ShardedArchive.create(root, settings, encoder, max_shard_slides)
    return Archive.create(root, settings, encoder)


class Shard(Archive):
    """One shard of a sharded archive: an archive whose reduction is its owner's."""

    def __init__(
        self,
        root: str | Path,
        *,
        owner: ShardedArchive,
        first_id: int,
        _create: dict[str, str] | None = None,
    ) -> None:
        self.owner, self.first_id = owner, first_id
        super().__init__(root, _create=_create)

    def fit_reducer(self, features: np.ndarray, generation: int) -> Reducer:
        """The archive's one reduction, written as this shard's for `generation`; fitted on
        `features` only when no shard has one yet."""
        shared = self.owner.shared_reducer()
        if shared is None:
            reducer = super().fit_reducer(features, generation)
            self.owner.share_reducer(reducer)
            return reducer
        path = self.path("reducer", ".npz", generation)
        self.write_derived(path, lambda file: save_reducer(shared, file))
        self._reducer = (generation, shared)
        return shared


class ShardedArchive:
    """The shards of a sharded archive behind the read API of one `Archive` (slides, ids,
    metadata, features) and its `add`, `check` and `reindex`. A shard whose folder cannot be
    opened is listed in `missing` with the reason, and left out of what is read."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = self._read_manifest()
        self._shared: tuple[int, Reducer] | None = None  # the reduction read, by checksum
        self.shards: dict[str, Shard] = {}
        self.missing: dict[str, str] = {}
        for name in self.names:
            self._open_shard(name)

    # -- the manifest ----------------------------------------------------------------------

    def _read_manifest(self) -> dict:
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            if not (
                isinstance(manifest["shards"], list)
                and len(manifest["first_ids"]) == len(manifest["shards"])
                and int(manifest["max_slides"]) >= 1
                and isinstance(manifest["settings"], dict)
            ):
                raise ValueError("shards, first_ids, max_slides or settings malformed")
        except FileNotFoundError:
            raise ArchiveError(self.root, "no sharded archive here (no shards.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ArchiveError(path, f"unreadable shard list ({error})") from None
        return manifest

    def _write_manifest(self) -> None:
        with atomic_path(self.root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1))

    @property
    def names(self) -> list[str]:
        """The shard folders, oldest first."""
        return list(self.manifest["shards"])

    @property
    def max_slides(self) -> int:
        return int(self.manifest["max_slides"])

    def _first_id(self, name: str) -> int:
        return int(self.manifest["first_ids"][self.names.index(name)])

    def _folder(self, name: str) -> Callable[..., Shard]:
        """What opens (or, with `_create`, creates) the shard `name`."""
        return partial(Shard, owner=self, first_id=self._first_id(name))

    def _open_shard(self, name: str) -> None:
        self.missing.pop(name, None)
        if not (self.root / name / CATALOG).is_file():
            self.missing[name] = f"the shard folder {self.root / name} is missing or not an archive"
            return
        try:
            self.shards[name] = self._folder(name)(self.root / name)
        except ArchiveError as error:
            self.missing[name] = str(error)

    @classmethod
    def create(
        cls,
        root: str | Path,
        settings: ArchiveSettings,
        encoder: Encoder | None = None,
        max_slides: int | None = None,
    ) -> Self:
        """A new sharded archive at `root` whose shards take at most `max_slides` slides each;
        an existing one is opened if it was built the same way, and refused otherwise."""
        root = Path(root)
        wanted = catalog_settings(settings, encoder)
        if is_sharded(root):
            archive = cls(root)
            if max_slides is not None and max_slides != archive.max_slides:
                raise ArchiveError(
                    root, f"its shards take {archive.max_slides} slides each, not {max_slides}"
                )
            archive.check_settings(**wanted)
            return archive
        if (root / CATALOG).is_file():
            raise ArchiveError(root, "a plain (unsharded) archive: it cannot take shards")
        if max_slides is None or max_slides < 1:
            raise ArchiveError(root, "a new sharded archive needs the most slides per shard (>= 1)")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "settings": wanted,
            "max_slides": max_slides,
            "shards": [],
            "first_ids": [],
            "reducer_crc": None,
        }
        with atomic_path(root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
        return cls(root)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- settings and the shared reduction -------------------------------------------------

    @property
    def settings(self) -> dict[str, str]:
        """The settings every shard is built with."""
        return dict(self.manifest["settings"])

    @property
    def tiling(self) -> Tiling:
        return Tiling.of(self.settings)

    @property
    def dim(self) -> int:
        return int(self.settings["n_features"])

    def check_settings(self, **wanted: object) -> None:
        """Refuse settings other than the archive's (see `Archive.check_settings`)."""
        stored = self.settings
        different = [
            f"{key} {value} (archive: {stored[key]})"
            for key, value in wanted.items()
            if key in MATCHED_KEYS and key in stored and stored[key] != str(value)
        ]
        if different:
            raise ArchiveError(
                self.root, "built with other settings; asked for " + ", ".join(different)
            )

    def check_encoder(self, encoder: Encoder) -> None:
        """Refuse an encoder (or weights) other than the one the archive was built with."""
        self.check_settings(encoder=encoder.name, dim=encoder.dim, weights=encoder.fingerprint)

    def shared_reducer(self) -> Reducer | None:
        """The reduction every shard's store is written with (None before the first fit, and
        for an unreduced archive); refused when its bytes differ from the recorded checksum."""
        crc = self.manifest.get("reducer_crc")
        if crc is None:
            return None
        if self._shared is not None and self._shared[0] == crc:
            return self._shared[1]
        path = self.root / SHARED_REDUCER
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArchiveError(
                path, "the archive's reduction is missing; run histosearch check --repair"
            ) from None
        if zlib.crc32(data) != crc:
            raise ArchiveError(
                path, "the archive's reduction differs from its checksum; run check --repair"
            )
        self._shared = (crc, load_reducer(io.BytesIO(data)))
        return self._shared[1]

    def share_reducer(self, reducer: Reducer) -> None:
        """Record `reducer` as the one every shard's store is written with."""
        buffer = io.BytesIO()
        save_reducer(reducer, buffer)
        with atomic_path(self.root / SHARED_REDUCER) as tmp:
            tmp.write_bytes(buffer.getvalue())
        self.manifest["reducer_crc"] = zlib.crc32(buffer.getvalue())
        self._write_manifest()

    def reducer(self) -> Reducer | None:
        """The archive's reduction (what a query's features are reduced with)."""
        return self.shared_reducer()

    # -- reading ---------------------------------------------------------------------------

    def slides(self) -> list[SlideRecord]:
        """All catalog rows of the shards that could be opened, by id."""
        return sorted((r for s in self.shards.values() for r in s.slides()), key=lambda r: r.id)

    def shard_of(self, slide_id: int) -> str:
        """The name of the shard whose id range holds `slide_id`."""
        position = int(np.searchsorted(self.manifest["first_ids"], int(slide_id), "right")) - 1
        if position < 0:
            raise ArchiveError(self.root, f"no slide with id {slide_id}")
        return self.names[position]

    def _shard(self, name: str) -> Shard:
        if name in self.missing:
            raise ArchiveError(
                self.root / name, f"shard {name} is unavailable: {self.missing[name]}"
            )
        return self.shards[name]

    def get(self, slide_id: int) -> SlideRecord:
        """The slide with catalog id `slide_id`, from the shard that holds it."""
        return self._shard(self.shard_of(slide_id)).get(slide_id)

    def find(self, query: str | Path) -> SlideRecord | None:
        """The slide stored from the file `query`, or named `query`, in any open shard."""
        key = catalog_key(query)
        for shard in self.shards.values():
            if (record := shard.catalog.by_path(key)) is not None:
                return record
        for shard in self.shards.values():
            if named := shard.catalog.by_name(str(query)):
                return named[0]
        return None

    def metadata(self) -> Metadata:
        """Every slide's metadata beyond the built-in columns, over the open shards."""
        values: dict[int, dict[str, str]] = {}
        for shard in self.shards.values():
            values.update(shard.catalog.metadata())
        return Metadata.of(values)

    def read(self, record: SlideRecord, with_features: bool = True) -> SlideFeatures:
        """A slide's stored features (see `Archive.read`), from its shard."""
        return self._shard(self.shard_of(record.id)).read(record, with_features)

    def patch_image(self, record: SlideRecord, row: int) -> np.ndarray:
        """RGB pixels of one stored patch (see `Archive.patch_image`)."""
        return self._shard(self.shard_of(record.id)).patch_image(record, row)

    @property
    def catalog(self) -> Catalog:
        """The first shard's catalog, which keeps the archive's relevance marks."""
        if not self.names:
            raise ArchiveError(self.root, "the archive is empty (no shard yet)")
        return self._shard(self.names[0]).catalog

    def describe(self) -> str:
        """One line: the shards, what they hold and how they were built."""
        records = self.slides()
        missing = f", {', '.join(self.missing)} missing" if self.missing else ""
        return (
            f"{len(self.names)} shards of up to {self.max_slides} slides{missing}; "
            f"{len(records)} slides, {sum(r.n_patches for r in records)} patches; "
            + describe_settings(self.settings)
        )

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the sharded archive's writer lock (the shards' own are taken as each is
        written)."""
        from filelock import FileLock, Timeout

        lock = FileLock(self.root / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ArchiveError(
                self.root, "the archive is being written; try again when it ends"
            ) from None
        except OSError as error:
            raise ArchiveError(
                self.root, f"cannot write to the archive ({error.strerror or error})"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _newest_with_room(self) -> Shard:
        """The newest shard, or a new one after it when it is full."""
        if self.names:
            name = self.names[-1]
            newest = self._shard(name)
            if len(newest.slides()) < self.max_slides:
                return newest
            first_id = max(newest.catalog.next_slide_id(), newest.first_id)
        else:
            first_id = 1
        name = f"shard-{len(self.names):03d}"
        self.manifest["shards"].append(name)
        self.manifest["first_ids"].append(first_id)
        self._write_manifest()
        shard = self.shards[name] = self._folder(name)(self.root / name, _create=self.settings)
        if self.shared_reducer() is not None:  # its slides stored at once, as in one archive
            with shard.writing():
                shard.fit_reducer(np.empty((0, 0)), shard.generation)
        return shard

    def store_slide(
        self, key: str, features: np.ndarray, coords: np.ndarray, **fields: object
    ) -> SlideRecord:
        """`Archive.store_slide` into the newest shard with room (call inside `writing()`,
        then `sync()`)."""
        shard = self._newest_with_room()
        with shard.writing():
            return shard.store_slide(key, features, coords, **fields)

    def add(
        self,
        inputs: Sequence[str | Path | Item],
        *,
        group_by: str | None = None,
        encoder: Encoder | None = None,
        weights: str | Path | None = None,
        options: EmbedOptions = DEFAULT_OPTIONS,
        on_progress: Callable[[str, int, int | None], None] | None = None,
        ray: bool | str = False,
        columns: Mapping[str, str] | None = None,
    ) -> IndexReport:
        """`Archive.add` over the shards: what no shard holds yet goes to the newest shard
        until it is full, then to a new one. Refused while a shard is missing (what it holds
        is unknown)."""
        from histosearch.archive.adding import IndexReport

        if self.missing:
            name, reason = next(iter(self.missing.items()))
            raise ArchiveError(self.root / name, f"cannot add while a shard is missing: {reason}")
        items, unreadable, encoder = inputs_to_add(
            self, inputs, group_by, columns, encoder, weights
        )
        report = IndexReport(failures=unreadable)
        with self.writing():
            stored = {r.path for r in self.slides()}
            todo = [item for item in items if item.key not in stored]
            report.skipped = len(items) - len(todo)
            while todo:
                shard = self._newest_with_room()
                room = self.max_slides - len(shard.slides())
                chunk, todo = todo[:room], todo[room:]
                done = report.added + len(report.failures) - len(unreadable)

                def progress(stage: str, n: int, total: int | None, done: int = done) -> None:
                    if on_progress is not None:
                        on_progress(stage, n + done if stage == "slides" else n, None)

                part = shard.add(
                    chunk,
                    encoder=encoder,
                    weights=weights,
                    options=options,
                    on_progress=progress,
                    ray=ray,
                )
                report.added += part.added
                report.skipped += part.skipped
                report.patches += part.patches
                report.failures += part.failures
        return report

    def annotate(self, table: str | Path) -> tuple[int, int]:
        """`Archive.annotate` over the shards: every row checked against all their slides
        before anything changes, then each shard's slides updated (shard by shard). Refused
        while a shard is missing."""
        if self.missing:
            name, reason = next(iter(self.missing.items()))
            raise ArchiveError(
                self.root / name, f"cannot annotate while a shard is missing: {reason}"
            )
        with self.writing():
            updates = annotations(Path(table), self.slides())
            changed = 0
            for name, shard in self.shards.items():
                mine = {i: u for i, u in updates.items() if self.shard_of(i) == name}
                if mine:
                    changed += shard.set_annotations(mine)
        return len(updates), changed

    def sync(self) -> None:
        """Finish what an add left in every shard."""
        for shard in self.shards.values():
            shard.sync()

    def reindex(self, on_progress: Callable[[str, int, int | None], None] | None = None) -> None:
        """Rebuild every shard's store and derived files as a new generation, with the
        archive's one reduction (not refitted: the shards must agree)."""
        with self.writing():
            for name in self.names:
                self._shard(name).reindex(on_progress)

    def check(self, repair: bool = False) -> list[Problem]:
        """`check` of every shard (a missing shard folder is named; `repair` works within
        each shard) and of the archive's reduction."""
        problems = []
        try:
            self.shared_reducer()
        except ArchiveError as error:
            first = self.shards.get(self.names[0]) if self.names else None
            problem = Problem(
                error.path or str(self.root), error.reason, "copy it back from shard-000"
            )
            if repair and first is not None and first.reducer() is not None:
                self.share_reducer(first.reducer())
                problem.done, problem.repaired = "copied back from the first shard", True
            problems.append(problem)
        for name in self.names:
            if not (self.root / name).is_dir():
                problems.append(
                    Problem(
                        str(self.root / name),
                        f"shard {name}, listed in {MANIFEST}, is missing (its slides cannot be "
                        "searched: restore the folder, or index them again)",
                        None,
                    )
                )
                continue
            if name in self.shards:
                self.shards.pop(name).close()
            try:
                found, _ = check_archive(self.root / name, repair, self._folder(name))
            except ArchiveError as error:
                found = [Problem(error.path or str(self.root / name), error.reason, None)]
            problems += found
            self._open_shard(name)
        return problems


def check_any(root: str | Path, repair: bool = False) -> tuple[list[Problem], str]:
    """`check_archive` of a plain or a sharded archive: the problems, and a description of
    the archive afterwards."""
    if not is_sharded(root):
        return check_archive(root, repair)
    with ShardedArchive(root) as archive:
        problems = archive.check(repair)
        return problems, archive.describe()
