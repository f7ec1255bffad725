"""`Archive`: an archive folder (see `folder.py` for what it holds) that slides are added to,
kept whole and checked. The jobs live in their own modules; this class is their front."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from histosearch.archive.catalog import ArchiveError, SlideRecord
from histosearch.archive.feature_files import SlideFeatures, write_feature_metadata
from histosearch.archive.folder import ArchiveFolder
from histosearch.archive.metadata import Metadata, annotations
from histosearch.archive.repair import Problem, check, check_archive
from histosearch.archive.settings import INDEX_METRICS, ArchiveSettings
from histosearch.archive.upkeep import reindex, sync
from histosearch.embed.options import DEFAULT_OPTIONS, EmbedOptions
from histosearch.inputs import Item, collect_items

if TYPE_CHECKING:
    from histosearch.archive.adding import IndexReport
    from histosearch.encoders import Encoder

__all__ = [
    "INDEX_METRICS",
    "Archive",
    "ArchiveError",
    "ArchiveSettings",
    "Metadata",
    "Problem",
    "SlideFeatures",
    "SlideRecord",
    "check_archive",
]


class _Encoding(Protocol):
    """What `inputs_to_add` needs of an archive, plain or sharded."""

    settings: Mapping[str, str]

    def check_encoder(self, encoder: Encoder) -> None: ...


def inputs_to_add(
    archive: _Encoding,
    inputs: Sequence[str | Path | Item],
    group_by: str | None,
    columns: Mapping[str, str] | None,
    encoder: Encoder | None,
    weights: str | Path | None,
) -> tuple[list[Item], list[tuple[str, str]], Encoder]:
    """What an `add` works on: the items of `inputs` (items given are taken as they are), the
    inputs that gave none with why (a refused manifest, a folder of no slides: reported with
    the failures while the others go on), and the encoder, built from the archive's settings
    when none is given, checked against them."""
    unreadable: list[tuple[str, str]] = []
    items = [i for i in inputs if isinstance(i, Item)] + collect_items(
        [Path(p) for p in inputs if not isinstance(p, Item)], group_by, unreadable, columns
    )
    if encoder is None:
        from histosearch.embed.batches import default_device
        from histosearch.encoders import create_encoder

        encoder = create_encoder(archive.settings["encoder"], weights).to(default_device())
    archive.check_encoder(encoder)
    return items, unreadable, encoder


class Archive(ArchiveFolder):
    """A folder of slides' patch embeddings with a catalog, a search store and the files a
    search derives from it."""

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
        """Embed and store the slides, folders of slides and manifests in `inputs` (or items
        collected from them) that the archive does not hold yet; failures are collected in the
        report, not raised. `options` gives the resolution of files that record none and the
        batching; `columns` reads a manifest's columns under histosearch's names
        ({"label": "diagnosis"}: its `diagnosis` column is the label).

        `on_progress(stage, done, total)` is called as slides ("slides") and patches
        ("patches") are done. `ray` spreads the embedding over Ray workers: True starts a
        local Ray instance, a string is a cluster's address; this process commits the rows.
        """
        from histosearch.archive.adding import index_items  # torch and the encoders, to add

        items, unreadable, encoder = inputs_to_add(
            self, inputs, group_by, columns, encoder, weights
        )
        with self.writing():
            report = index_items(
                self,
                items,
                encoder,
                options,
                on_progress=on_progress,
                ray=ray,
                weights=weights,
            )
            report.failures[:0] = unreadable
            sync(self)
        return report

    def annotate(self, table: str | Path) -> tuple[int, int]:
        """Add or update the metadata of archived slides from a CSV (`slide` or `path`, then
        one column per field; an empty cell removes that value), without re-embedding: the
        catalog and every changed slide's feature file. Everything is checked before
        anything changes (see `metadata.annotations`). Returns (rows matched, slides
        changed); running it again changes nothing."""
        with self.writing():
            updates = annotations(Path(table), self.slides())
            return len(updates), self.set_annotations(updates)

    def set_annotations(self, updates: Mapping[int, Mapping[str, str | None]]) -> int:
        """Apply metadata updates ({slide id: {column: value, None to remove it}}, as
        `metadata.annotations` reads them) to this archive's slides: every changed slide's
        feature file, then the catalog. Returns how many slides changed."""
        with self.writing():
            records = {r.id: r for r in self.slides()}
            current = self.catalog.metadata()
            changed = {}
            for slide_id, values in updates.items():
                before = current.get(slide_id, {})
                after = {k: v for k, v in {**before, **values}.items() if v is not None}
                if after != before:
                    changed[slide_id] = after
            crcs = {}
            for slide_id, after in changed.items():  # the interchange copy first
                record = records[slide_id]
                crcs[slide_id] = write_feature_metadata(
                    self.root / record.feature_file, after, record.features_crc
                )
            self.catalog.set_metadata({i: dict(updates[i]) for i in changed}, features_crc=crcs)
        return len(changed)

    def sync(self) -> None:
        """Finish what an add left: fit the reduction if there is none yet, store the slides
        not yet in the search store, bring the derived files up to date."""
        sync(self)

    def reindex(self, on_progress: Callable[[str, int, int | None], None] | None = None) -> None:
        """Refit the reduction on every slide's full features and rebuild the store and the
        derived files as a new generation; searches see the switch at once."""
        reindex(self, on_progress)

    def check(self, repair: bool = False) -> list[Problem]:
        """Verify every part of the archive; with `repair`, rebuild what can be derived and
        drop slides whose feature file is lost."""
        return check(self, repair)
