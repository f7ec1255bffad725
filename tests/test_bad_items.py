"""One bad item costs only itself: embedding, indexing and training data skip it by name."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from data_paths import LC

from histosearch.embed import ImageDataset, embed_dataset
from histosearch.encoders import create_encoder
from histosearch.errors import SlideReadError

IMAGES = sorted((LC / "images" / "lung_aca").glob("*.jpeg"))


def _with_truncated(tmp_path: Path, count: int, bad_at: int) -> list[Path]:
    """`count` real LC25000 patches, the one at `bad_at` truncated to half its bytes."""
    paths = list(IMAGES[:count])
    bad = tmp_path / f"truncated-{IMAGES[bad_at].name}"
    bad.write_bytes(IMAGES[bad_at].read_bytes()[: IMAGES[bad_at].stat().st_size // 2])
    paths[bad_at] = bad
    return paths


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("color-histogram")


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_items_are_skipped_inside_the_workers(tmp_path: Path, encoder, workers: int):
    paths = _with_truncated(tmp_path, 10, 3)
    failures: dict[int, str] = {}
    seen: list[int] = []
    features = embed_dataset(
        ImageDataset(paths, 224), encoder, 4, workers, seen.append, failures=failures
    )
    assert list(failures) == [3] and f"{paths[3]}: cannot read image: truncated" in failures[3]
    assert sum(seen) == 10
    good = embed_dataset(ImageDataset(paths[:3] + paths[4:], 224), encoder, 4, 0)
    np.testing.assert_allclose(features, good, atol=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_without_a_failures_dict_the_first_bad_item_raises_naming_it(
    tmp_path: Path, encoder, workers: int
):
    paths = _with_truncated(tmp_path, 6, 2)
    with pytest.raises(SlideReadError, match="truncated") as caught:
        embed_dataset(ImageDataset(paths, 224), encoder, 4, workers)
    assert caught.value.path == str(paths[2])
    assert "DataLoader worker" not in str(caught.value)


def test_a_patch_run_with_one_truncated_jpeg_stores_the_others(tmp_path: Path, encoder):
    from histosearch.archive.adding import PATCH_RUN
    from histosearch.archive.archive import Archive, ArchiveSettings
    from histosearch.embed.options import EmbedOptions

    paths = _with_truncated(tmp_path, PATCH_RUN, 40)
    manifest = tmp_path / "run.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},lung_aca\n" for p in paths))
    settings = ArchiveSettings(encoder="color-histogram", reduction="none")
    with Archive.create(tmp_path / "archive", settings, encoder) as archive:
        report = archive.add([manifest], encoder=encoder, options=EmbedOptions(num_workers=1))
        assert report.added == PATCH_RUN - 1
        assert len(report.failures) == 1 and report.failures[0][0] == paths[40].name
        assert f"{paths[40]}: cannot read image: truncated" in report.failures[0][1]
        assert paths[40].name not in {r.name for r in archive.slides()}


def test_training_data_skips_unreadable_images_and_names_them(tmp_path: Path):
    from histosearch.train.trainer import TrainSettings, prepare

    paths = _with_truncated(tmp_path, 20, 5)
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},lung_aca\n" for p in paths))
    settings = TrainSettings(method="byol", manifest=str(manifest), image_size=32, batch_size=8)
    failures: list[str] = []
    data = prepare(settings, tmp_path / "run", failures)
    assert data.images.shape == (19, 32, 32, 3)
    assert len(failures) == 1 and f"{paths[5]}: cannot read image: truncated" in failures[0]
    with pytest.raises(SlideReadError, match="truncated"):
        prepare(settings, tmp_path / "run")


def _lc_rows(tmp_path: Path, groups: int) -> tuple[Path, list[dict[str, str]]]:
    with (LC / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    chosen = sorted({r["group"] for r in rows if r["label"] == "lung_aca"})[:groups]
    chosen += sorted({r["group"] for r in rows if r["label"] == "lung_n"})[:groups]
    return LC / "manifest.csv", [r for r in rows if r["group"] in chosen]


def test_holdout_fraction_zero_holds_out_nothing(tmp_path: Path):
    from histosearch.train.trainer import TrainingError, TrainSettings, _holdout

    manifest, rows = _lc_rows(tmp_path, 3)
    out = tmp_path / "run"
    out.mkdir()
    (out / "heldout.csv").write_text("stale")
    settings = TrainSettings(method="lgffem", manifest=str(manifest), holdout_fraction=0.0)
    assert _holdout(rows, settings, manifest, out) == rows
    assert not (out / "heldout.csv").exists()
    settings.holdout_fraction = 0.34
    kept = _holdout(rows, settings, manifest, out)
    held = {r["group"] for r in rows} - {r["group"] for r in kept}
    assert len(held) == 2  # round(6 groups x 0.34)
    settings.holdout_fraction = 1.0
    with pytest.raises(TrainingError, match=r"must be in \[0, 1\)"):
        _holdout(rows, settings, manifest, out)


def test_a_group_name_longer_than_a_file_name_allows_is_stored_like_any(tmp_path: Path, encoder):
    from histosearch.archive.archive import Archive, ArchiveSettings

    long_name = "g" * 300
    manifest = tmp_path / "groups.csv"
    rows = [(IMAGES[0], long_name), (IMAGES[1], long_name), (IMAGES[2], "after")]
    manifest.write_text("path,label,group\n" + "".join(f"{p},lung_aca,{g}\n" for p, g in rows))
    settings = ArchiveSettings(encoder="color-histogram", reduction="none")
    with Archive.create(tmp_path / "archive", settings, encoder) as archive:
        report = archive.add([manifest], group_by="group", encoder=encoder)
        assert report.added == 2 and not report.failures
        stored = {r.name: r for r in archive.slides()}
        assert set(stored) == {long_name, "after"} and stored[long_name].n_patches == 2
        assert len(Path(stored[long_name].feature_file).name.encode()) <= 255


def test_percentiles_read_as_ordinals():
    from histosearch.cli.common import ordinal

    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 50, 100, 101, 112)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "50th",
        "100th", "101st", "112th",
    ]  # fmt: skip
    # a percentile as the page writes it: from the JSON's one decimal, half up (Math.round)
    from histosearch.cli.common import percentile_ordinal

    assert [percentile_ordinal(p) for p in (52.5, 53.5, 52.46, 52.44, 0.4, 99.96)] == [
        "53rd", "54th", "53rd", "52nd", "0th", "100th",
    ]  # fmt: skip
