"""bench mosaic on a few real IDC slides: figures for every mosaic, written as JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path

from data_paths import DATA

from histosearch.bench.mosaic import bench_mosaic, idc_slides, plot_mosaic, write_mosaic_json


def test_bench_mosaic_on_real_slides(tmp_path: Path):
    slides, dropped = idc_slides(DATA, 100)
    assert dropped > 0  # the set's edge patches, under 32 px a side
    assert len(slides) == 4 and all(len(s.paths) >= 100 for s in slides)
    rows, refused = bench_mosaic(DATA, mosaics=("all", "16"), min_patches=100, repeats=1)
    assert refused == dropped
    full, sixteen = rows
    assert full.tiles_per_slide == sum(len(s.paths) for s in slides) / len(slides)
    assert sixteen.tiles_per_slide == 16 and sixteen.embed_cpu_s < full.embed_cpu_s
    assert sixteen.store_kb_per_slide == 16 * (128 * 2 + 8) / 1024
    assert all(0 <= r.metrics["MV@5"] <= 1 and r.embed_cpu_s > 0 for r in rows)
    write_mosaic_json(rows, {"set": "idc"}, tmp_path / "m.json")
    plot_mosaic(rows, tmp_path / "m.png")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert [r["mosaic"] for r in saved["rows"]] == ["all", "16"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
