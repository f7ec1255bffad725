"""Building an archive from slides and patch groups: incremental, resumable, batch-tolerant."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from histosearch.archive.archive import Archive
from histosearch.embed import ImageDataset, embed_dataset, embed_path, is_patch_file
from histosearch.encoders import Encoder
from histosearch.errors import HistosearchError
from histosearch.inputs import Item

# Patches (single or in groups) are embedded together in runs of about this many images, so
# that they share one data loader; each entry is stored as soon as its run is done.
PATCH_RUN = 128


@dataclass
class IndexReport:
    """What an `index` run did."""

    added: int = 0
    skipped: int = 0
    patches: int = 0
    failures: list[tuple[str, str]] | None = None


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
    on_item: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> IndexReport:
    """Embed and store every item not yet in the archive; failures are collected, not raised."""
    report = IndexReport(failures=[])
    stored = {record.path for record in archive.slides()}
    todo = [item for item in items if item.key not in stored]
    report.skipped = len(items) - len(todo)
    magnification = float(archive.settings["magnification"])
    tile_size = int(archive.settings["tile_size"])
    tissue = archive.settings["tissue"]

    def add(
        item: Item,
        features: np.ndarray,
        coords: np.ndarray,
        item_mpp: float | None,
        paths: list[str] | None,
    ) -> None:
        archive.add(
            item.key,
            features,
            coords,
            name=item.name,
            label=item.label,
            patient=item.patient,
            group=item.group,
            mpp=item_mpp,
            paths=paths,
        )
        report.added += 1
        report.patches += len(features)
        if on_item is not None:
            on_item(item.name)

    is_patch = [item.is_group or is_patch_file(item.paths[0], tile_size) for item in todo]
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
                add(item, rows, np.zeros((len(good), 2), np.int64), None, paths=good)
                row += len(good)

    for item in slides:
        try:
            features, coords, item_mpp = embed_path(
                item.paths[0],
                encoder,
                magnification,
                tile_size,
                tissue,
                mpp=mpp,
                objective_power=objective_power,
                batch_size=batch_size,
                num_workers=num_workers,
                on_batch=on_batch,
            )
            add(item, features, coords, item_mpp, paths=None)
        except HistosearchError as error:
            report.failures.append((item.name, str(error)))
        except Exception as error:  # one bad slide must not stop a batch
            report.failures.append(
                (item.name, f"{item.paths[0]}: unexpected {type(error).__name__}: {error}")
            )
    if report.added:
        archive.build_index()
    return report
