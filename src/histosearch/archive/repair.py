"""`check` and `check --repair`: every part of an archive verified, and what can be derived
again (the store, the reduction, the derived files, even the catalog) rebuilt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histosearch.archive.catalog import CATALOG, ArchiveError
from histosearch.archive.feature_files import attr_metadata, read_feature_attrs
from histosearch.archive.folder import ArchiveFolder
from histosearch.archive.settings import MATCHED_KEYS
from histosearch.archive.upkeep import derived_problems, reindex


@dataclass
class Problem:
    """One thing `check` found wrong, and whether `--repair` can mend it."""

    path: str
    reason: str
    repairable: bool
    repaired: bool = False


def check(archive: ArchiveFolder, repair: bool = False) -> list[Problem]:
    """Verify every part of the archive; with `repair`, rebuild what can be derived (store,
    reduction, derived files) and drop slides whose feature file is lost."""
    problems: list[Problem] = []
    integrity = archive.catalog.integrity()
    if integrity != "ok":
        problems.append(Problem(str(archive.catalog.path), integrity, False))
        return problems
    lost = []
    for record in archive.slides():
        try:
            archive.read(record, with_features=False)
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
        archive.reducer()
        view = archive.view()
        if pending := len(archive.pending()):
            problems.append(
                Problem(
                    str(archive.catalog.path), f"{pending} slides not in the search store", True
                )
            )
            derived_ok = False
        if len(view.records):
            for path, reason in derived_problems(archive, view):
                problems.append(Problem(str(path), reason, True))
                derived_ok = False
    except ArchiveError as error:
        problems.append(Problem(error.path or str(archive.root), error.reason, True))
        derived_ok = False
    if repair and problems:
        with archive.writing():
            if lost:
                archive.catalog.remove_slides(r.id for r in lost)
            if (lost or not derived_ok) and archive.slides():
                reindex(archive)
        for problem in problems:
            problem.repaired = True
    return problems


def check_archive(root: str | Path, repair: bool = False) -> tuple[list[Problem], str]:
    """`check` that also meets a catalog too damaged to open: with `repair`, the catalog is
    rebuilt from the feature files (the damaged one is kept beside it). Returns the problems
    and a description of the archive as it is afterwards."""
    root = Path(root)
    problems = []
    try:
        archive = ArchiveFolder.open(root)
    except ArchiveError as error:
        if not (root / "features").is_dir():
            raise
        problems.append(Problem(error.path or str(root), error.reason, True))
        if not repair:
            return problems, "catalog unreadable"
        archive = rebuild_catalog(root)
        problems[0].repaired = True
    with archive:
        problems += check(archive, repair=repair)
        return problems, archive.describe()


def rebuild_catalog(root: Path) -> ArchiveFolder:
    """A new catalog from the settings and slide metadata (built-in columns and the rest)
    every feature file carries; the
    damaged catalog is renamed, never deleted. The store is rebuilt (`reindex`)."""
    entries = []
    for path in sorted((root / "features").glob("*.h5")):
        read = read_feature_attrs(path)
        if read is not None:  # unreadable: that slide is lost and must be indexed again
            entries.append((path, *read))
    if not entries:
        raise ArchiveError(root, "no readable feature file to rebuild the catalog from")
    settings = {k: str(entries[0][1][k]) for k in MATCHED_KEYS if k in entries[0][1]}
    catalog = root / CATALOG
    for suffix in ("", "-wal", "-shm"):
        damaged = catalog.with_name(catalog.name + suffix)
        if damaged.exists():
            damaged.rename(damaged.with_name(damaged.name + ".damaged"))
    archive = ArchiveFolder(root, _create=settings)
    with archive.writing():
        for derived in (*root.glob("store/*"), *root.glob("*-[0-9]*.npz"), *root.glob("*.faiss")):
            derived.unlink()
        archive.catalog.add_slides(
            [
                {
                    "name": attrs.get("name", path.stem),
                    "path": attrs["slide"],
                    "label": attrs.get("label"),
                    "patient": attrs.get("patient"),
                    "grp": attrs.get("group"),
                    "mpp": attrs.get("mpp"),
                    "n_patches": n_patches,
                    "feature_file": path.relative_to(root).as_posix(),
                    "tile_l0": attrs.get("tile_l0"),
                    "metadata": attr_metadata(attrs),
                }
                for path, attrs, n_patches in entries
            ],
            ignore_known=True,
        )
        reindex(archive)
    return archive
