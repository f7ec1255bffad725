"""`histosearch bench mosaic`: slide retrieval, storage per slide and extraction time of
mosaics (mosaic.py) against every tile, on the IDC dev set's slides (each patient's IDC and
non-IDC patches as two slides of one case, their patches placed by the set's coordinates)."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from histosearch.embed.batches import ImageDataset, embed_dataset
from histosearch.encoders import Encoder, create_encoder
from histosearch.evaluation.protocols import evaluate_slides
from histosearch.fileio import atomic_path
from histosearch.mosaic import COLOUR_PX, choose_mosaic, mosaic_size, parse_mosaic, rgb_histograms
from histosearch.slide import read_image
from histosearch.tissue import patch_reason

MOSAICS = ("all", "5%", "10%", "20%", "16", "32", "64")
# what the archive's store keeps per patch: a 128-d float16 vector and two int32 coordinates
STORE_BYTES_PER_TILE = 128 * 2 + 2 * 4
REPEATS = 3


@dataclass(frozen=True)
class BenchSlide:
    """One slide of the benchmark: its patch files, their positions, label and case."""

    paths: list[Path]
    positions: np.ndarray
    label: str
    patient: str


@dataclass(frozen=True)
class MosaicRow:
    """One mosaic's figures over all slides."""

    mosaic: str
    slides: int
    tiles_per_slide: float
    store_kb_per_slide: float
    select_cpu_s: float
    embed_cpu_s: float
    metrics: dict[str, float]


def idc_slides(data: Path, min_patches: int) -> tuple[list[BenchSlide], int]:
    """The IDC dev set's slides (patient x label) with at least `min_patches` patches that
    an archive accepts (tissue.patch_reason: the set's edge patches under 32 px a side and
    flat ones are refused), and how many patches were left out so."""
    root = data / "idc-breast-dev"
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    dropped = 0
    with (root / "manifest.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            if patch_reason(read_image(root / row["path"])):
                dropped += 1
                continue
            groups.setdefault((row["patient"], row["label"]), []).append(row)
    slides = [
        BenchSlide(
            [root / r["path"] for r in rows],
            np.array([[int(r["x"]), int(r["y"])] for r in rows]),
            label,
            patient,
        )
        for (patient, label), rows in sorted(groups.items())
        if len(rows) >= min_patches
    ]
    return slides, dropped


def patch_colours(paths: Sequence[Path]) -> np.ndarray:
    """The mosaic's colour of each patch: its RGB histogram at COLOUR_PX x COLOUR_PX."""
    small = [
        np.asarray(Image.open(p).convert("RGB").resize((COLOUR_PX, COLOUR_PX), Image.BOX))
        for p in paths
    ]
    return rgb_histograms(np.stack(small))


def bench_mosaic(
    data: Path,
    encoder_name: str = "color-histogram",
    mosaics: Sequence[str] = MOSAICS,
    min_patches: int = 32,
    repeats: int = REPEATS,
    on_mosaic: Callable[[str], None] | None = None,
) -> tuple[list[MosaicRow], int]:
    """Leave-one-out slide search (other cases only) of every slide with each mosaic of its
    patches: only the mosaic's patches are read and embedded, and both are timed in CPU
    seconds of this process (steadier than wall time on a shared CPU; embedding as the best
    of `repeats`; the choice reads every patch small, for its colour; the files are read once
    beforehand, by `idc_slides`). With the rows, the number of patches refused."""
    slides, refused = idc_slides(data, min_patches)  # every file read once: all mosaics read warm
    encoder = create_encoder(encoder_name)
    threads = torch.get_num_threads()
    # one thread (torch, and k-means' OpenMP): CPU time that other processes do not inflate
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return _bench(slides, encoder, mosaics, repeats, on_mosaic), refused
    finally:
        torch.set_num_threads(threads)


def _bench(
    slides: list[BenchSlide],
    encoder: Encoder,
    mosaics: Sequence[str],
    repeats: int,
    on_mosaic: Callable[[str], None] | None,
) -> list[MosaicRow]:
    """The rows of `bench_mosaic`, one per mosaic."""
    embed_dataset(ImageDataset(slides[0].paths, encoder.input_size), encoder, 64, 0)  # warm-up
    rows = []
    for mosaic in (parse_mosaic(m) for m in mosaics):
        if on_mosaic:
            on_mosaic(mosaic)
        start = time.process_time()
        chosen = [
            np.arange(len(s.paths))
            if mosaic == "all"
            else choose_mosaic(
                patch_colours(s.paths), s.positions, mosaic_size(mosaic, len(s.paths))
            )
            for s in slides
        ]
        select_cpu_s = time.process_time() - start
        embed_cpu_s = np.inf
        for _ in range(repeats):  # the best of `repeats`: this CPU is shared
            start = time.process_time()
            features = [
                embed_dataset(
                    ImageDataset([s.paths[i] for i in picks], encoder.input_size), encoder, 64, 0
                )
                for s, picks in zip(slides, chosen, strict=True)
            ]
            embed_cpu_s = min(embed_cpu_s, time.process_time() - start)
        (metrics,) = evaluate_slides(
            features, [s.label for s in slides], (1, 5), [], [s.patient for s in slides]
        ).values()
        tiles = float(np.mean([len(p) for p in chosen]))
        rows.append(
            MosaicRow(
                mosaic,
                len(slides),
                tiles,
                tiles * STORE_BYTES_PER_TILE / 1024,
                select_cpu_s,
                embed_cpu_s,
                {k: float(metrics[k]) for k in ("Acc@1", "MV@5", "mAP@5")},
            )
        )
    return rows


def write_mosaic_json(rows: Sequence[MosaicRow], meta: dict[str, object], out: Path) -> None:
    """The figures as JSON, atomically."""
    with atomic_path(out) as tmp:
        payload = {**meta, "rows": [asdict(r) for r in rows]}
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def plot_mosaic(rows: Sequence[MosaicRow], out: Path) -> None:
    """Retrieval (MV@5, Acc@1) against stored tiles per slide, one point per mosaic."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    tiles = [r.tiles_per_slide for r in rows]
    for metric, marker in (("MV@5", "o"), ("Acc@1", "s")):
        axis.scatter(tiles, [r.metrics[metric] for r in rows], marker=marker, label=metric)
    for r in rows:
        axis.annotate(r.mosaic, (r.tiles_per_slide, r.metrics["MV@5"]), fontsize=8)
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("tiles stored per slide (mean)")
    axis.set_ylabel("slide retrieval")
    axis.set_title(f"Mosaics vs every tile: {rows[0].slides} IDC slides, leave-one-case-out")
    axis.legend()
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
