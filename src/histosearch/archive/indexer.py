"""Embedding what `Archive.add` is given: slides and patch groups, incremental, resumable,
batch-tolerant."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histosearch.embed import ImageDataset, embed_dataset, embed_path, is_patch_file
from histosearch.encoders import Encoder
from histosearch.errors import HistosearchError
from histosearch.inputs import Item
from histosearch.slide import open_slide

if TYPE_CHECKING:
    from histosearch.archive.archive import Archive

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


@dataclass(frozen=True)
class EmbeddedFile:
    """A file's tile embeddings, their level-0 positions, its resolution and the side of one
    tile at level 0 (None for an image embedded whole)."""

    features: np.ndarray
    coords: np.ndarray
    mpp: float | None
    tile_l0: float | None


def embed_file(
    path: str | Path,
    encoder: Encoder,
    settings: dict[str, str],
    *,
    mpp: float | None = None,
    objective_power: float | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> EmbeddedFile:
    """Embed a slide or image file exactly as an archive with `settings` embeds its slides."""
    magnification, tile_size = float(settings["magnification"]), int(settings["tile_size"])
    features, coords, found_mpp = embed_path(
        path,
        encoder,
        magnification,
        tile_size,
        settings["tissue"],
        mpp=mpp,
        objective_power=objective_power,
        batch_size=batch_size,
        num_workers=num_workers,
        on_batch=on_batch,
        edges=settings.get("edges", "drop"),
    )
    with open_slide(path, mpp=mpp, objective_power=objective_power) as slide:
        whole = max(slide.dimensions) <= tile_size
        tile_l0 = None if whole else tile_size * slide.downsample_for(magnification)
    return EmbeddedFile(features, coords, found_mpp, tile_l0)


def is_patch_item(item: Item, tile_size: int) -> bool:
    """A patch group, or an image no larger than a tile: embedded whole, image by image."""
    return item.is_group or is_patch_file(item.paths[0], tile_size)


def embed_item(
    item: Item,
    encoder: Encoder,
    settings: dict[str, str],
    *,
    mpp: float | None = None,
    objective_power: float | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> EmbeddedFile:
    """One item embedded as an archive with `settings` stores it: a patch group's images
    whole, a slide by its tissue tiles."""
    if is_patch_item(item, int(settings["tile_size"])):
        dataset = ImageDataset(item.paths, encoder.input_size)
        features = embed_dataset(dataset, encoder, batch_size, num_workers, on_batch)
        return EmbeddedFile(features, np.zeros((len(features), 2), np.int64), None, None)
    return embed_file(
        item.paths[0],
        encoder,
        settings,
        mpp=mpp,
        objective_power=objective_power,
        batch_size=batch_size,
        num_workers=num_workers,
        on_batch=on_batch,
    )


def store_item(archive: Archive, item: Item, embedded: EmbeddedFile) -> None:
    """Store one embedded item in the archive (the caller holds its writer lock)."""
    patches = is_patch_item(item, int(archive.settings["tile_size"]))
    archive.store_slide(
        item.key,
        embedded.features,
        embedded.coords,
        name=item.name,
        label=item.label,
        patient=item.patient,
        group=item.group,
        mpp=embedded.mpp,
        tile_l0=embedded.tile_l0,
        paths=[str(p) for p in item.paths] if patches else None,
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
    archive: Archive,
    items: list[Item],
    encoder: Encoder,
    *,
    mpp: float | None = None,
    objective_power: float | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
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
    tile_size = int(archive.settings["tile_size"])
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
        from histosearch.archive.distributed import EmbedSettings, embed_items_on_ray

        embed_items_on_ray(
            todo,
            archive.settings["encoder"],
            weights,
            EmbedSettings(dict(archive.settings), mpp, objective_power, batch_size),
            address=None if ray is True else ray,
            on_result=add,
            on_failure=lambda item, message: report.failures.append((item.name, message)),
        )
        return report

    is_patch = [is_patch_item(item, tile_size) for item in todo]
    patches = [item for item, flag in zip(todo, is_patch, strict=True) if flag]
    slides = [item for item, flag in zip(todo, is_patch, strict=True) if not flag]
    for run in _runs(patches):
        paths = [p for item in run for p in item.paths]
        bad: dict[int, str] = {}  # one unreadable patch costs only itself
        features = embed_dataset(
            ImageDataset(paths, encoder.input_size),
            encoder,
            batch_size,
            num_workers,
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
            embedded = embed_item(
                item,
                encoder,
                archive.settings,
                mpp=mpp,
                objective_power=objective_power,
                batch_size=batch_size,
                num_workers=num_workers,
                on_batch=on_batch,
            )
            add(item, embedded)
        except HistosearchError as error:
            report.failures.append((item.name, str(error)))
        except Exception as error:  # one bad slide must not stop a batch
            report.failures.append(
                (item.name, f"{item.paths[0]}: unexpected {type(error).__name__}: {error}")
            )
    return report
