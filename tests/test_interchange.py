"""Features in from TRIDENT and CLAM folders and out in TRIDENT's layout: folders written from
real slides' features (embedded here with the offline encoder), imported, searched."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from data_paths import CMU, TCGA
from typer.testing import CliRunner

from histosearch import Archive, ArchiveSettings, EmbedOptions, Searcher
from histosearch.archive.interchange import export_trident, import_features
from histosearch.cli import app
from histosearch.encoders import EncoderError

ENCODER = "efficientnet-lite0-imagenet"
SETTINGS = ArchiveSettings(encoder=ENCODER, magnification=5.0, tile_size=224)


@pytest.fixture(scope="module")
def encoder():
    from histosearch.encoders import create_encoder

    return create_encoder(ENCODER)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, ome_tiff: Path, encoder) -> Path:
    """An archive embedded by histosearch: CMU-1 (SVS), its pixels as an OME-TIFF, the TCGA
    frozen section (20x given), at 5x."""
    root = tmp_path_factory.mktemp("original") / "archive"
    with Archive.create(root, SETTINGS) as archive:
        options = EmbedOptions(objective_power=20.0)
        archive.add([CMU, ome_tiff, TCGA], encoder=encoder, options=options)
    return root


def searches(root: Path) -> dict[str, list[tuple[str, float]]]:
    """Every slide's top 5 (name, similarity), its own entry excluded, keyed by its name."""
    with Archive.open(root) as archive:
        searcher = Searcher(archive)
        return {
            record.name: [
                (hit.record.name, hit.similarity)
                for hit in searcher.search(record.id, k=5, mode="slides").slides
            ]
            for record in archive.slides()
        }


def assert_same_searches(root: Path, reference: Path) -> None:
    got, want = searches(root), searches(reference)
    assert sorted(got) == sorted(want) and all(len(hits) == 2 for hits in want.values())
    for name, hits in want.items():
        assert [n for n, _ in got[name]] == [n for n, _ in hits], name
        np.testing.assert_allclose([s for _, s in got[name]], [s for _, s in hits], atol=1e-3)


def write_trident_job(root: Path, archive_dir: Path) -> Path:
    """A TRIDENT job folder as TRIDENT's save_h5 writes it (attributes on `coords`, in both
    the features and the patches file), from an archive's features; and its `wsi,mpp` list."""
    grid = root / "5x_224px_0px_overlap"
    (grid / "patches").mkdir(parents=True)
    (grid / "features_uni_v1").mkdir()
    rows = []
    with Archive.open(archive_dir) as archive:
        for record in archive.slides():
            stored = archive.read(record)
            name = record.name.split(".")[0]
            src = round(5 * record.tile_l0 / 224)  # TRIDENT records a nominal objective
            attrs = {
                "patch_size": 224,
                "patch_size_level0": 224 * src // 5,
                "level0_magnification": src,
                "target_magnification": 5,
                "overlap": 0,
                "name": name,
                "savetodir": str(grid),
                "level0_width": 0,  # replaced below from the slide
                "level0_height": 0,
            }
            from histosearch import open_slide

            with open_slide(record.path, objective_power=20.0) as slide:
                attrs["level0_width"], attrs["level0_height"] = slide.dimensions
            with h5py.File(grid / "patches" / f"{name}_patches.h5", "w") as h5:
                h5.create_dataset("coords", data=stored.coords.astype(np.int64))
                h5["coords"].attrs.update(attrs)
            with h5py.File(grid / "features_uni_v1" / f"{name}.h5", "w") as h5:
                h5.create_dataset("features", data=stored.features.astype(np.float32))
                h5["features"].attrs.update({"name": name, "encoder": "uni_v1"})
                h5.create_dataset("coords", data=stored.coords.astype(np.int64))
                h5["coords"].attrs.update(attrs)
            rows.append({"wsi": record.path, "mpp": record.mpp or "", "label": f"L-{name}"})
    with (root / "list.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["wsi", "mpp", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def trident_job(tmp_path_factory: pytest.TempPathFactory, original: Path) -> Path:
    return write_trident_job(tmp_path_factory.mktemp("trident"), original)


def test_trident_folder_imported_searches_as_the_original(
    tmp_path: Path, original: Path, trident_job: Path, encoder
):
    report = import_features(
        tmp_path / "a", trident_job, encoder, slides=trident_job / "list.csv", settings=SETTINGS
    )
    assert (report.added, report.skipped, report.failures) == (3, 0, [])
    assert_same_searches(tmp_path / "a", original)
    with Archive.open(tmp_path / "a") as archive:
        assert archive.settings["imported"] == "trident"
        assert archive.settings["magnification"] == "5" and archive.settings["tile_size"] == "224"
        records = {r.name: r for r in archive.slides()}
        assert sorted(records) == sorted([CMU.name, TCGA.name, "cmu-1.ome.tif"])
        cmu = records[CMU.name]
        assert Path(cmu.path) == CMU.resolve()  # viewable: the slide file
        assert cmu.label == "L-cmu-1-small-region" and cmu.mpp == pytest.approx(0.499)
        assert cmu.tile_l0 == 224 * 20 / 5
        # queryable by region: only the tiles whose centre lies in the box
        region = Searcher(archive).search(cmu.id, k=2, region=(900, 0, 900, 900), mode="slides")
        assert [(t.x, t.y) for t in region.query.tiles] == [(896, 0)] and region.slides
    # imported again: nothing new
    again = import_features(tmp_path / "a", trident_job, encoder, slides=trident_job / "list.csv")
    assert (again.added, again.skipped) == (0, 3)


def test_features_without_slide_files_are_searchable_by_name(
    tmp_path: Path, trident_job: Path, encoder
):
    report = import_features(tmp_path / "a", trident_job / "5x_224px_0px_overlap", encoder)
    assert report.added == 3 and not report.failures
    with Archive.open(tmp_path / "a") as archive:
        names = sorted(r.name for r in archive.slides())
        assert names == ["cmu-1", "cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"]
        assert not any(Path(r.path).is_file() for r in archive.slides())
        result = Searcher(archive).search("cmu-1-small-region", k=2)
        # the OME-TIFF holds CMU-1's pixels (JPEG-compressed again): the best match
        assert result.slides[0].record.name == "cmu-1" and result.slides[0].similarity > 0.85


def test_export_then_import_is_the_identity(tmp_path: Path, original: Path, encoder):
    with Archive.open(original) as archive:
        exported = export_trident(archive, tmp_path / "job")
        records = archive.slides()
        features = {r.name: archive.read(r).features for r in records}
    assert exported.written == 3 and not exported.skipped
    # read as a MIL pipeline reads TRIDENT's output
    path = tmp_path / "job" / "5x_224px_0px_overlap" / "features_efficientnet-lite0-imagenet"
    with h5py.File(path / "cmu-1-small-region.h5") as h5:
        assert h5["features"].shape == (len(features[CMU.name]), 1280)
        attrs = h5["coords"].attrs
        assert (attrs["patch_size"], attrs["patch_size_level0"]) == (224, 896)
        assert (attrs["target_magnification"], attrs["level0_magnification"]) == (5.0, 20.0)
        assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
    patches = tmp_path / "job" / "5x_224px_0px_overlap" / "patches" / "cmu-1_patches.h5"
    assert patches.is_file()  # TRIDENT's name of cmu-1.ome.tif: both extensions cut
    report = import_features(
        tmp_path / "back", tmp_path / "job", encoder, slides=tmp_path / "job" / "slides.csv"
    )
    assert report.added == 3 and not report.failures
    with Archive.open(tmp_path / "back") as archive:
        back = {r.name: r for r in archive.slides()}
        for record in records:
            twin = back[record.name]
            assert (twin.path, twin.n_patches, twin.mpp) == (
                record.path,
                record.n_patches,
                record.mpp,
            )
            assert twin.tile_l0 == pytest.approx(record.tile_l0, rel=1e-9)
            np.testing.assert_array_equal(archive.read(twin).features, features[record.name])
    assert_same_searches(tmp_path / "back", original)


def write_clam(root: Path, archive_dir: Path, with_patches: bool = True) -> Path:
    """CLAM's output: h5_files/<slide>.h5 with features and coords (no attributes), and
    patches/<slide>.h5 whose coords carry patch_size and the level's downsample."""
    (root / "h5_files").mkdir(parents=True)
    (root / "patches").mkdir()
    with Archive.open(archive_dir) as archive:
        for record in archive.slides():
            if record.name == "cmu-1.ome.tif":
                continue
            stored = archive.read(record)
            name = Path(record.name).stem
            with h5py.File(root / "h5_files" / f"{name}.h5", "w") as h5:
                h5.create_dataset("features", data=stored.features.astype(np.float32))
                h5.create_dataset("coords", data=stored.coords)
            if with_patches:
                with h5py.File(root / "patches" / f"{name}.h5", "w") as h5:
                    h5.create_dataset("coords", data=stored.coords)
                    h5["coords"].attrs.update(
                        {"patch_size": 224, "patch_level": 2, "downsample": (4.0, 4.0)}
                    )
    return root


def test_clam_folder_with_a_slide_list(tmp_path: Path, original: Path, encoder):
    clam = write_clam(tmp_path / "clam", original)
    listing = tmp_path / "list.csv"
    listing.write_text(f"wsi,mpp,site\n{CMU},,skin\n{TCGA},0.5,colon\n")
    report = import_features(tmp_path / "a", clam, encoder, slides=listing)
    assert (report.added, report.failures) == (2, [])
    with Archive.open(tmp_path / "a") as archive:
        assert archive.settings["imported"] == "clam"
        assert archive.settings["magnification"] == "5"  # CMU-1's file: 20x
        records = {r.name: r for r in archive.slides()}
        assert records[TCGA.name].mpp == 0.5 and records[TCGA.name].tile_l0 == 896
        assert archive.catalog.metadata()[records[CMU.name].id] == {"site": "skin"}
        hit = Searcher(archive).search(CMU.name, k=1).slides[0]
    with Archive.open(original) as archive:
        want = Searcher(archive).search(CMU.name, k=2).slides
    want = next(h for h in want if h.record.name == TCGA.name)
    assert hit.record.name == TCGA.name
    assert hit.similarity == pytest.approx(want.similarity, abs=1e-3)


# -- refusals: the file and the reason, the other files imported ---------------------------


def test_unknown_scale_is_refused(tmp_path: Path, original: Path, encoder):
    clam = write_clam(tmp_path / "clam", original, with_patches=False)
    report = import_features(tmp_path / "a", clam, encoder)
    assert report.added == 0 and len(report.failures) == 2
    name, reason = report.failures[0]
    assert name == "cmu-1-small-region"
    assert reason.startswith(str(clam / "h5_files" / "cmu-1-small-region.h5"))
    assert "the scale is unknown" in reason and "patches/<name>.h5" in reason
    assert not (tmp_path / "a").exists()  # no archive begun on nothing


def test_clam_without_level0_magnification_is_refused(tmp_path: Path, original: Path, encoder):
    clam = write_clam(tmp_path / "clam", original)
    listing = tmp_path / "list.csv"
    listing.write_text(f"wsi,mpp\n{CMU},\n{TCGA},\n")  # TCGA's file records no resolution
    report = import_features(tmp_path / "a", clam, encoder, slides=listing)
    assert report.added == 1
    [(name, reason)] = report.failures
    assert name == "tcga-cr-7395-01a-01-ts1" and "give no level-0 magnification" in reason


def copy_job(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target / "5x_224px_0px_overlap" / "features_uni_v1"


def test_features_of_another_dimension_are_refused(tmp_path: Path, trident_job: Path, encoder):
    features = copy_job(trident_job, tmp_path / "job")
    with h5py.File(features / "cmu-1.h5", "r+") as h5:
        rows = len(h5["features"])
        del h5["features"]
        h5.create_dataset("features", data=np.ones((rows, 1024), np.float32))
    report = import_features(tmp_path / "a", tmp_path / "job", encoder)
    assert report.added == 2
    [(name, reason)] = report.failures
    assert name == "cmu-1"
    assert reason == f"{features / 'cmu-1.h5'}: features of dimension 1024; the encoder gives 1280"


def test_coordinates_outside_the_slide_are_refused(tmp_path: Path, trident_job: Path, encoder):
    features = copy_job(trident_job, tmp_path / "job")
    with h5py.File(features / "cmu-1-small-region.h5", "r+") as h5:
        h5["coords"][0] = (2220, 100)  # one past the slide's right edge
    report = import_features(
        tmp_path / "a", tmp_path / "job", encoder, slides=tmp_path / "job" / "list.csv"
    )
    assert report.added == 2
    [(_, reason)] = report.failures
    assert "1 of 5 coordinates lie outside the slide of 2220 x 2967 px, e.g. (2220, 100)" in reason


def test_several_encoders_or_no_features_folder_are_refused(
    tmp_path: Path, trident_job: Path, encoder
):
    from histosearch.archive.trident import FeatureFolderError

    features = copy_job(trident_job, tmp_path / "job")
    (features.parent / "features_conch_v15").mkdir()
    with pytest.raises(FeatureFolderError, match="several encoders or magnifications"):
        import_features(tmp_path / "a", tmp_path / "job", encoder)
    with pytest.raises(FeatureFolderError, match="neither a TRIDENT job folder"):
        import_features(tmp_path / "a", tmp_path, encoder)


# -- the command line -----------------------------------------------------------------------


def test_index_features_and_export_commands(tmp_path: Path, trident_job: Path):
    runner = CliRunner()
    args = ["index", "--features", str(trident_job), "--archive"]
    listing = ["--slides", str(trident_job / "list.csv")]
    result = runner.invoke(app, [*args, str(tmp_path / "a"), *listing, "--encoder", ENCODER])
    assert result.exit_code == 0, result.output
    assert "imported 3 slides" in result.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--archive", str(tmp_path / "a"), "--trident", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 slides" in result.output
    assert (out / "slides.csv").is_file()
    # the encoder must be one histosearch can build (a query by file is embedded with it)
    unknown = runner.invoke(app, [*args, str(tmp_path / "b"), "--encoder", "no-such-encoder"])
    assert isinstance(unknown.exception, EncoderError)  # main() prints it as one line
    assert "unknown encoder" in str(unknown.exception)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("no coords", "no coords dataset"),
        ("truncated", "unreadable"),
        ("empty", "holds no patches"),
    ],
)
def test_broken_feature_files_are_refused(
    tmp_path: Path, trident_job: Path, encoder, damage: str, reason: str
):
    features = copy_job(trident_job, tmp_path / "job")
    target = features / "cmu-1.h5"
    if damage == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(target, "r+") as h5:
            del h5["coords"]
            if damage == "empty":
                del h5["features"]
                h5.create_dataset("features", data=np.empty((0,), np.float32))
                h5.create_dataset("coords", data=np.empty((0, 2), np.int64))
    report = import_features(tmp_path / "a", tmp_path / "job", encoder)
    assert report.added == 2
    [(name, message)] = report.failures
    assert name == "cmu-1" and message.startswith(f"{target}: {reason}")


def test_weights_fingerprint_is_recorded(tmp_path: Path, trident_job: Path):
    import timm
    import torch

    from histosearch.archive.catalog import ArchiveError
    from histosearch.encoders import create_encoder

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    encoder = create_encoder("timm:resnet18", tmp_path / "r18.pth")
    features = copy_job(trident_job, tmp_path / "job")
    for path in features.glob("*.h5"):
        with h5py.File(path, "r+") as h5:
            rows = len(h5["features"])
            del h5["features"]
            h5["features"] = np.random.default_rng(0).standard_normal((rows, 512), np.float32)
    report = import_features(tmp_path / "a", tmp_path / "job", encoder)
    assert report.added == 3 and not report.failures
    with Archive.open(tmp_path / "a") as archive:
        settings = archive.settings
    assert (settings["encoder"], settings["dim"]) == ("timm:resnet18", "512")
    assert settings["weights"] == encoder.fingerprint and len(encoder.fingerprint) == 16
    # the same encoder with other weights is another archive's
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "b.pth")
    with pytest.raises(ArchiveError, match="built with other settings; asked for weights"):
        import_features(
            tmp_path / "a", tmp_path / "job", create_encoder("timm:resnet18", tmp_path / "b.pth")
        )


def test_a_slide_listed_twice_is_refused(tmp_path: Path, trident_job: Path, encoder):
    from histosearch.inputs import ManifestError

    listing = tmp_path / "list.csv"
    listing.write_text(f"wsi,mpp\n{CMU},0.5\nother/{CMU.name},0.25\n")
    with pytest.raises(ManifestError, match="line 3: slide cmu-1-small-region is listed already"):
        import_features(tmp_path / "a", trident_job, encoder, slides=listing)
    listing.write_text(f"wsi,mpp\n{CMU},fast\n")
    with pytest.raises(ManifestError, match="line 2: mpp 'fast' is not positive"):
        import_features(tmp_path / "a", trident_job, encoder, slides=listing)


def test_a_slide_of_another_scale_than_its_features_is_refused(
    tmp_path: Path, trident_job: Path, encoder
):
    listing = tmp_path / "list.csv"
    listing.write_text(f"wsi,mpp\n{CMU},0.25\n")  # 40x: the features were cut from a 20x scan
    report = import_features(tmp_path / "a", trident_job, encoder, slides=listing)
    assert report.added == 2
    [(name, reason)] = report.failures
    assert name == "cmu-1-small-region"
    assert reason.endswith(
        f"cut from a 20x scan, but its slide is 40x ({CMU.resolve()}): "
        "another slide, or the wrong mpp"
    )
