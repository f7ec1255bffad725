"""`check` and `check --repair`: every part of an archive verified against the checksums
recorded when it was written, and what can be derived again (the store, the reduction, the
derived files, even the catalog) rebuilt from intact sources."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from histosearch.archive.catalog import CATALOG, ArchiveError
from histosearch.archive.feature_files import (
    attr_metadata,
    file_checksum,
    read_feature_attrs,
    read_feature_file,
)
from histosearch.archive.folder import ArchiveFolder
from histosearch.archive.settings import MATCHED_KEYS
from histosearch.archive.upkeep import derived_problems, reindex

DAMAGED = ".damaged"


@dataclass
class Problem:
    """One thing `check` found wrong. `fix` says what `--repair` does about it (None: nothing
    it can do); after a repair, `done` says what it did, and `repaired` whether the archive is
    whole again in that respect (a slide taken out for want of its features is not)."""

    path: str
    reason: str
    fix: str | None
    done: str | None = None
    repaired: bool = False

    @property
    def repairable(self) -> bool:
        return self.fix is not None


REBUILT = "rebuilt from the feature files"


def check(archive: ArchiveFolder, repair: bool = False) -> list[Problem]:
    """Verify every part of the archive: each slide's feature file (there, its own slide's,
    the bytes its checksum says), each slide's store rows, the reduction and the derived
    files. With `repair`, slides whose feature file is lost or damaged are taken out of the
    catalog (the file set aside as `.damaged`: the slide must be indexed again) and what is
    derived is rebuilt from the intact feature files."""
    integrity = archive.catalog.integrity()
    if integrity != "ok":
        return [Problem(str(archive.catalog.path), integrity, None)]
    lost: dict[int, Problem] = {}
    records = archive.slides()
    by_crc = {r.features_crc: r for r in records if r.features_crc is not None}
    for record in records:
        try:
            archive.read(record)
        except ArchiveError as error:
            reason = error.reason
            path = archive.root / record.feature_file
            with contextlib.suppress(OSError):
                other = by_crc.get(file_checksum(path))
                if other is not None and other.id != record.id:
                    reason = f"holds another slide ({other.path}): a copy of its feature file"
            lost[record.id] = Problem(
                error.path or str(path),
                reason,
                f"take {record.name} out of the archive (index {record.path} again)",
            )
    derived = _derived_problems(archive)
    if repair and (lost or derived):
        with archive.writing():
            if lost:
                for record in archive.slides():
                    if record.id in lost:
                        _set_aside(archive.root / record.feature_file)
                        lost[record.id].done = f"taken out; index {record.path} again"
                archive.catalog.remove_slides(lost)
            left = bool(archive.slides())
            if left:
                reindex(archive)
            for problem in derived:
                problem.repaired = left
                problem.done = REBUILT if left else "not rebuilt: no intact slide is left"
    return [*lost.values(), *derived]


def _derived_problems(archive: ArchiveFolder) -> list[Problem]:
    """What is wrong in the store, the reduction and the files derived from the store."""
    try:
        archive.reducer()
        view = archive.view()
    except ArchiveError as error:
        return [Problem(error.path or str(archive.root), error.reason, REBUILT)]
    problems = []
    if pending := len(archive.pending()):
        problems.append(
            Problem(str(archive.catalog.path), f"{pending} slides not in the search store", REBUILT)
        )
    for position in range(len(view.records)):
        try:
            view.verify([position])
        except ArchiveError as error:
            problems.append(Problem(error.path or str(archive.root), error.reason, REBUILT))
    if len(view.records):
        problems += [
            Problem(str(path), reason, REBUILT) for path, reason in derived_problems(archive, view)
        ]
    return problems


def _set_aside(path: Path) -> None:
    """Rename a damaged file to `<name>.damaged` (never deleted: it may be looked into)."""
    if path.exists():
        path.rename(path.with_name(path.name + DAMAGED))


def check_archive(
    root: str | Path, repair: bool = False, folder: Callable[..., ArchiveFolder] = ArchiveFolder
) -> tuple[list[Problem], str]:
    """`check` that also meets a catalog too damaged to open: with `repair`, the catalog is
    rebuilt from the feature files (the damaged one is kept beside it). Returns the problems
    and a description of the archive as it is afterwards. `folder(root)` opens the archive
    (`folder(root, _create=settings)` for a new catalog): a shard's keeps its archive's
    reduction."""
    root = Path(root)
    try:
        archive = folder(root)
    except ArchiveError as error:
        if not (root / "features").is_dir():
            raise
        problem = Problem(error.path or str(root), error.reason, "rebuild the catalog")
        if not repair:
            return [problem], "catalog unreadable"
        archive, notes = rebuild_catalog(root, folder)
        problem.done, problem.repaired = "; ".join(["rebuilt", *notes]), True
        problems = [problem]
    else:
        problems = []
    with archive:
        problems += check(archive, repair=repair)
        return problems, archive.describe()


def rebuild_catalog(
    root: Path, folder: Callable[..., ArchiveFolder] = ArchiveFolder
) -> tuple[ArchiveFolder, list[str]]:
    """A new catalog from the settings, ids and slide metadata (built-in columns and the
    rest) every intact feature file carries, and the relevance marks the damaged catalog still
    yields; the damaged catalog is renamed, never deleted, and so is a feature file whose
    bytes differ from its checksum. The store is rebuilt (`reindex`). Returns the archive and
    notes on what could not be kept."""
    entries, notes = [], []
    for path in sorted((root / "features").glob("*.h5")):
        read = read_feature_attrs(path)
        intact = read is not None and (
            "checksum" not in read[0]
            or read_feature_file(path, path.stem).checksum == read[0]["checksum"]
        )
        if read is None or not intact:  # that slide is lost and must be indexed again
            _set_aside(path)
            notes.append(f"{path.name} is damaged (set aside; index its slide again)")
        else:
            entries.append((path, *read))
    if not entries:
        raise ArchiveError(root, "no intact feature file to rebuild the catalog from")
    settings = {k: str(entries[0][1][k]) for k in MATCHED_KEYS if k in entries[0][1]}
    catalog = root / CATALOG
    for suffix in ("", "-wal", "-shm"):  # catalog.sqlite.damaged(-wal): SQLite still reads both
        damaged = catalog.with_name(catalog.name + suffix)
        if damaged.exists():
            damaged.rename(catalog.with_name(catalog.name + DAMAGED + suffix))
    archive = folder(root, _create=settings)
    with archive.writing():
        for derived in (*root.glob("store/*"), *root.glob("*-[0-9]*.npz"), *root.glob("*.faiss")):
            derived.unlink()
        archive.catalog.add_slides(
            [
                {
                    "id": attrs.get("id"),
                    "name": attrs.get("name", path.stem),
                    "path": attrs["slide"],
                    "label": attrs.get("label"),
                    "patient": attrs.get("patient"),
                    "grp": attrs.get("group"),
                    "mpp": attrs.get("mpp"),
                    "n_patches": n_patches,
                    "feature_file": path.relative_to(root).as_posix(),
                    "tile_l0": attrs.get("tile_l0"),
                    "features_crc": file_checksum(path),
                    "metadata": attr_metadata(attrs),
                }
                for path, attrs, n_patches in entries
            ],
            ignore_known=True,
        )
        marks = archive.catalog.salvage_marks(catalog.with_name(catalog.name + DAMAGED))
        if marks is None:
            notes.append("the relevance marks could not be read from the damaged catalog")
        elif marks:
            notes.append(f"{marks} relevance marks kept")
        reindex(archive)
    return archive, notes
