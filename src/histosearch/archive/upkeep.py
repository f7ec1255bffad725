"""Keeping an archive's store whole: storing what an add left pending (`sync`), rebuilding
the store as a new generation (`reindex`), and bringing the files derived from the store up to
date.

What is derived from the store (the search layer's patch index and calibration) is not known
here: each maintainer is found through the `histosearch.archive` entry points of the installed
packages and called after every change, so the archive depends on none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Protocol

import numpy as np

from histosearch.archive.catalog import ArchiveError
from histosearch.archive.folder import ArchiveFolder, searchable
from histosearch.archive.store import VectorStore
from histosearch.archive.view import SearchView

UPKEEP_GROUP = "histosearch.archive"


class Derived(Protocol):
    """Files derived from one store generation, kept up to date by the archive's writers."""

    def update(self, archive: ArchiveFolder, view: SearchView) -> None:
        """Bring the files up to date with the view (build them when missing)."""

    def problems(self, archive: ArchiveFolder, view: SearchView) -> list[tuple[Path, str]]:
        """What is missing or wrong in the files, as (path, reason); `update` mends it."""

    def files(self, archive: ArchiveFolder, generation: int) -> list[Path]:
        """The files of `generation` (removed with it)."""


@cache
def derived() -> tuple[Derived, ...]:
    """The maintainers of derived files registered by the installed packages."""
    from importlib.metadata import entry_points

    found = tuple(entry.load() for entry in entry_points(group=UPKEEP_GROUP))
    if not found:
        raise ArchiveError(
            None,
            f"no '{UPKEEP_GROUP}' entry points: histosearch is not installed "
            "(pip install -e . in its checkout)",
        )
    return found


def update_derived(archive: ArchiveFolder, view: SearchView) -> None:
    """Bring every derived file up to date with `view`."""
    for maintainer in derived():
        maintainer.update(archive, view)


def derived_problems(archive: ArchiveFolder, view: SearchView) -> list[tuple[Path, str]]:
    """What is missing or wrong in the derived files of `view`'s generation."""
    return [p for maintainer in derived() for p in maintainer.problems(archive, view)]


def sync(archive: ArchiveFolder) -> None:
    """Finish what an add left: fit the reduction if there is none yet, store the slides not
    yet in the search store, bring the derived files up to date."""
    with archive.writing():
        pending = archive.pending()
        if pending and archive.reducer() is None and archive.settings["reduction"] != "none":
            blocks = [archive.read(r).features for r in pending]
            archive.fit_reducer(np.concatenate(blocks), archive.generation)
        for record in pending:
            stored = archive.read(record)
            rows = archive.append_to_store(stored.features, stored.coords)
            archive.catalog.set_stored({record.id: rows})
        view = archive.view()
        if len(view.records):
            update_derived(archive, view)


def reindex(
    archive: ArchiveFolder, on_progress: Callable[[str, int, int | None], None] | None = None
) -> None:
    """Refit the reduction on every slide's full features and rebuild the store and the
    derived files as a new generation beside the current one, then switch to it in one
    catalog transaction: searches go on reading the generation they started on meanwhile."""
    with archive.writing():
        records = archive.slides()
        if not records:
            raise ArchiveError(archive.root, "the archive is empty")
        old, new = archive.generation, archive.generation + 1
        reducer = None
        if archive.settings["reduction"] != "none":
            features, _, _ = archive.all_features()
            reducer = archive.fit_reducer(features, new)
            del features
        store = VectorStore(archive.root, new, archive.dim)
        store.remove()
        start, stored, placed = 0, {}, []
        for done, record in enumerate(records):
            features = archive.read(record)
            crc = store.append(start, searchable(features.features, reducer), features.coords)
            stored[record.id] = (start, crc)
            placed.append(replace(record, row_start=start, store_crc=crc))
            start += record.n_patches
            if on_progress is not None:
                on_progress("slides", done + 1, len(records))
        update_derived(archive, archive.view_of(placed, new))
        archive.catalog.set_stored(stored, generation=new)
        archive.settings = archive.catalog.settings()
        remove_generation(archive, old)


def remove_generation(archive: ArchiveFolder, generation: int) -> None:
    """Delete the store, reduction and derived files of a generation no longer current."""
    archive.forget_derived(archive.path("reducer", ".npz", generation))
    for maintainer in derived():
        for path in maintainer.files(archive, generation):
            archive.forget_derived(path)
    VectorStore(archive.root, generation, archive.dim).remove()
