"""Embedding and storing what `Archive.add` is given: slides and patch groups, incremental,
resumable, batch-tolerant (one bad input costs only itself)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from histosearch.archive.folder import ArchiveFolder
from histosearch.embed.batches import ImageDataset, embed_dataset
from histosearch.embed.items import EmbeddedFile, embed_item, is_patch_item
from histosearch.embed.options import DEFAULT_OPTIONS, EmbedOptions
from histosearch.encoders import Encoder
from histosearch.errors import HistosearchError
from histosearch.inputs import Item
from histosearch.slide import magnification_from_mpp

# Patches (single or in groups) are embedded together in runs of about this many images, so
# that they share one data loader; each entry is stored as soon as its run is done.
PATCH_RUN = 128


@dataclass
class IndexReport:
    """What an `add` did: entries added and already there, patches stored, and the entries
    that failed with the reason."""

    added: int = 0
    skipped: int = 0
    patches: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.added + self.skipped + len(self.failures)


def store_item(archive: ArchiveFolder, item: Item, embedded: EmbeddedFile) -> None:
    """Store one embedded item in the archive (the caller holds its writer lock)."""
    patches = is_patch_item(item, archive.tiling.tile_size)
    mpp = embedded.mpp
    if patches and mpp is None:  # the scale a manifest row gives, recorded, not used
        power = item.objective_power
        mpp = item.mpp or (magnification_from_mpp(power) if power else None)  # 10/x both ways
    archive.store_slide(
        item.key,
        embedded.features,
        embedded.coords,
        name=item.name,
        label=item.label,
        patient=item.patient,
        group=item.group,
        mpp=mpp,
        tile_l0=embedded.tile_l0,
        paths=[str(p) for p in item.paths] if patches else None,
        metadata=item.metadata,
    )


def _runs(items: list[Item]) -> list[list[Item]]:
    """Consecutive patch entries gathered until each run holds about PATCH_RUN images."""
    runs: list[list[Item]] = [[]]
    for item in items:
        if sum(len(i.paths) for i in runs[-1]) >= PATCH_RUN:
            runs.append([])
        runs[-1].append(item)
    return [run for run in runs if run]


def index_items(
    archive: ArchiveFolder,
    items: list[Item],
    encoder: Encoder,
    options: EmbedOptions = DEFAULT_OPTIONS,
    *,
    on_progress: Callable[[str, int, int | None], None] | None = None,
    ray: bool | str = False,
    weights: str | Path | None = None,
) -> IndexReport:
    """Embed and store every item not yet in the archive (the caller holds its writer lock);
    failures are collected, not raised. With `ray` (True: a local instance, or a cluster's
    address) the items are embedded by Ray actors, each creating the archive's encoder from
    its name and `weights`, and stored here as they arrive."""
    report = IndexReport()
    stored = {record.path for record in archive.slides()}
    todo = [item for item in items if item.key not in stored]
    report.skipped = len(items) - len(todo)
    tiling = archive.tiling
    done_patches = 0

    def progress(stage: str, done: int, total: int | None) -> None:
        if on_progress is not None:
            on_progress(stage, done, total)

    def on_batch(n: int) -> None:
        nonlocal done_patches
        done_patches += n
        progress("patches", done_patches, None)

    def add(item: Item, embedded: EmbeddedFile) -> None:
        store_item(archive, item, embedded)
        report.added += 1
        report.patches += len(embedded.features)
        progress("slides", report.added + len(report.failures), len(todo))

    if ray:
        from histosearch.embed.distributed import embed_items_on_ray

        embed_items_on_ray(
            todo,
            archive.settings["encoder"],
            weights,
            tiling,
            options,
            address=None if ray is True else ray,
            on_result=add,
            on_failure=lambda item, message: report.failures.append((item.name, message)),
        )
        return report

    is_patch = [is_patch_item(item, tiling.tile_size) for item in todo]
    patches = [item for item, flag in zip(todo, is_patch, strict=True) if flag]
    slides = [item for item, flag in zip(todo, is_patch, strict=True) if not flag]
    for run in _runs(patches):
        paths = [p for item in run for p in item.paths]
        bad: dict[int, str] = {}  # one unreadable patch costs only itself
        features = embed_dataset(
            ImageDataset(paths, encoder.input_size, refuse_blank=True),
            encoder,
            options.batch_size,
            options.num_workers,
            on_batch,
            failures=bad,
        )
        start = row = 0
        for item in run:
            good = [str(p) for i, p in enumerate(item.paths, start) if i not in bad]
            report.failures.extend(
                (item.name, bad[i]) for i in range(start, start + len(item.paths)) if i in bad
            )
            start += len(item.paths)
            if good:
                rows = features[row : row + len(good)]
                coords = np.zeros((len(good), 2), np.int64)
                add(
                    replace(item, paths=[Path(p) for p in good]),
                    EmbeddedFile(rows, coords, None, None),
                )
                row += len(good)

    for item in slides:
        try:
            embedded = embed_item(item, encoder, tiling, options, on_batch)
            add(item, embedded)
        except HistosearchError as error:
            report.failures.append((item.name, str(error)))
        except Exception as error:  # one bad slide must not stop a batch
            report.failures.append(
                (item.name, f"{item.paths[0]}: unexpected {type(error).__name__}: {error}")
            )
    return report
