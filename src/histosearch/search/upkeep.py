"""The search layer's files derived from an archive's store: the patch index
(`index-G.faiss`), stage 1's sketches (`sketches-G.npz`) and the calibration
(`calibration-G.npz`). The archive's writers keep them up
to date through `SEARCH_FILES` (the `histosearch.archive` entry point); searches load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histosearch.archive.catalog import ArchiveError
from histosearch.archive.folder import ArchiveFolder
from histosearch.archive.view import SearchView
from histosearch.search.calibration import measure_calibration
from histosearch.search.patch_index import PatchIndex
from histosearch.search.two_stage import SKETCH_ROWS, Sketches

# Percentiles are measured on at most this many slides and patches of the archive (each
# against the whole archive), again whenever the store has grown by this factor.
CALIBRATION_SLIDES = 200
CALIBRATION_PATCHES = 2000
RECALIBRATE_GROWTH = 1.1
# The patch index and the sketches are written again only once the store rows (slides) they
# lack pass this share of those they hold: searches add the rest in memory as they load them
# (`load_patch_index`, `load_sketches`), so adding a slide to a 10^8-patch archive does not
# rewrite 7 GB each time (once per ~200 slides of 1,000 patches).
UNSAVED_SHARE = 1 / 512


def _read_index(archive: ArchiveFolder, path: Path) -> PatchIndex:
    with archive.open_derived(path, "patch index") as file:
        try:
            return PatchIndex.read(file)
        except RuntimeError as error:
            raise ArchiveError(
                path,
                f"unreadable patch index ({str(error).splitlines()[0][:80]}); "
                "run histosearch check --repair",
            ) from None


def load_patch_index(archive: ArchiveFolder, view: SearchView) -> PatchIndex:
    """The patch index over exactly the view's rows (rows committed since it was saved are
    added in memory; the next writer saves them)."""
    path = archive.path("index", ".faiss", view.generation)
    index = _read_index(archive, path)
    if index.ntotal > len(view.vectors):
        raise ArchiveError(
            path,
            f"the patch index holds {index.ntotal} rows, the catalog {len(view.vectors)}; "
            "run histosearch check --repair",
        )
    if index.metric != archive.index_metric:
        raise ArchiveError(path, "the patch index has the wrong metric; run check --repair")
    index.add(view.vectors[index.ntotal :])
    return index


def _read_sketches(archive: ArchiveFolder, path: Path, view: SearchView) -> Sketches:
    with archive.open_derived(path, "sketch file (stage 1's rows of each slide)") as file:
        try:
            sketches = Sketches.load(file)
        except Exception as error:  # numpy's zip errors name no file
            raise ArchiveError(
                path,
                f"unreadable sketches ({type(error).__name__}); run histosearch check --repair",
            ) from None
    if (
        sketches.per_slide != SKETCH_ROWS
        or sketches.rows.shape[1:] != view.vectors.shape[1:]
        or sketches.n_slides > len(view.records)
    ):
        raise ArchiveError(
            path, "the sketches do not match the store; run histosearch check --repair"
        )
    return sketches


def load_sketches(archive: ArchiveFolder, view: SearchView) -> Sketches:
    """Stage 1's sketches of the view's slides (those of slides committed since they were
    saved are read from the store, in memory; the next writer saves them)."""
    path = archive.path("sketches", ".npz", view.generation)
    return _read_sketches(archive, path, view).extended(view.vectors, view.offsets)


def load_calibration(
    archive: ArchiveFolder, generation: int | None = None
) -> dict[str, np.ndarray]:
    """Sorted nearest-neighbour similarities of the archive's patches and slides, and the
    number of store rows they were measured on, of store generation `generation` (the
    current one by default)."""
    path = archive.path("calibration", ".npz", generation)
    with archive.open_derived(path, "calibration (what percentiles are measured against)") as file:
        try:
            with np.load(file) as data:
                return {k: data[k] for k in ("patches", "slides", "rows")}
        except Exception as error:  # numpy's zip and pickle errors name no file
            raise ArchiveError(
                path,
                f"unreadable calibration ({type(error).__name__}); run histosearch check --repair",
            ) from None


def _outdated(covered: int | None, total: int) -> bool:
    """Whether a file derived from `covered` of the store's `total` rows (or slides) is to be
    written again: when it lacks more than UNSAVED_SHARE of what it holds, covers more than
    the store holds (an add that never committed), or its coverage is not recorded."""
    return covered is None or covered > total or total - covered > UNSAVED_SHARE * covered


class SearchFiles:
    """Keeps the patch index, the sketches and the calibration of an archive up to date with
    its store."""

    def update(self, archive: ArchiveFolder, view: SearchView) -> None:
        """Append the store rows the patch index and the sketches lack and save them (or build
        them) when they lack more than UNSAVED_SHARE; measure the calibration again when the
        store grew."""
        path = archive.path("index", ".faiss", view.generation)
        if _outdated(archive.derived_covers(path), len(view.vectors)):
            self._write_index(archive, view, path)
        path = archive.path("sketches", ".npz", view.generation)
        if _outdated(archive.derived_covers(path), len(view.records)):
            self._write_sketches(archive, view, path)
        try:
            measured = int(load_calibration(archive, view.generation)["rows"])
        except ArchiveError:  # missing or damaged: measured again
            measured = 0
        # measured again when the archive has grown by a tenth since (or shrunk: reindexed)
        if not measured <= len(view.vectors) <= RECALIBRATE_GROWTH * measured:
            index, sketches = load_patch_index(archive, view), load_sketches(archive, view)
            self._calibrate(archive, view, index, sketches)

    @staticmethod
    def _write_index(archive: ArchiveFolder, view: SearchView, path: Path) -> None:
        """Append the store rows the saved patch index lacks and save it; built afresh (its
        FAISS type chosen by the archive's size) when missing, damaged or over rows that were
        never committed."""
        try:
            index = _read_index(archive, path) if path.is_file() else None
        except ArchiveError:
            index = None
        if index is not None and index.ntotal > len(view.vectors):
            index = None
        if index is None:
            index = PatchIndex.build(view.vectors, archive.index_metric)
        else:
            index.add(view.vectors[index.ntotal :])
        archive.write_derived(path, index.write, covers=len(view.vectors))

    @staticmethod
    def _write_sketches(archive: ArchiveFolder, view: SearchView, path: Path) -> None:
        """Add the sketches of the slides stored since the file was saved and save it; built
        afresh when missing or damaged."""
        try:
            sketches = _read_sketches(archive, path, view) if path.is_file() else None
        except ArchiveError:
            sketches = None
        if sketches is None:
            sketches = Sketches.of(view.vectors, view.offsets[:1])
        extended = sketches.extended(view.vectors, view.offsets)
        archive.write_derived(path, extended.save, covers=len(view.records))

    @staticmethod
    def _calibrate(
        archive: ArchiveFolder, view: SearchView, index: PatchIndex, sketches: Sketches
    ) -> None:
        """Measure the archive's own nearest-neighbour similarities (slides and patches),
        against which search results are given as percentiles."""
        patch_nn, slide_nn = measure_calibration(
            view, index, CALIBRATION_SLIDES, CALIBRATION_PATCHES, sketches=sketches
        )
        archive.write_derived(
            archive.path("calibration", ".npz", view.generation),
            lambda file: np.savez(file, patches=patch_nn, slides=slide_nn, rows=len(view.vectors)),
        )

    def problems(self, archive: ArchiveFolder, view: SearchView) -> list[tuple[Path, str]]:
        """The patch index, the sketches or the calibration missing, unreadable, changed since
        written or not matching the store."""
        found = []
        for load in (
            load_patch_index,
            load_sketches,
            lambda a, v: load_calibration(a, v.generation),
        ):
            try:
                load(archive, view)
            except ArchiveError as error:
                found.append((Path(error.path or archive.root), error.reason))
        return found

    def files(self, archive: ArchiveFolder, generation: int) -> list[Path]:
        return [
            archive.path("index", ".faiss", generation),
            archive.path("sketches", ".npz", generation),
            archive.path("calibration", ".npz", generation),
        ]


SEARCH_FILES = SearchFiles()
