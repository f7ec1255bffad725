"""What a new user meets first (issue 19): mistakes refused before torch is imported, one
Ctrl-C during `index` stopping cleanly and resuming to the same archive, a failed first
`index` locking nothing, and `encoders` saying what is on disk."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_paths import CMU, DATA, LC, TCGA, WSI
from typer.testing import CliRunner

from histosearch.cli import app

runner = CliRunner()
CLI = [sys.executable, "-X", "importtime", "-m", "histosearch.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, set[str]]:
    """`histosearch ARGS` in a fresh interpreter: exit status, the messages on stderr (the
    import-time lines left out) and the modules it imported."""
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time")}
    messages = " ".join(line for line in lines if not line.startswith("import time"))
    return done.returncode, " ".join((done.stdout + messages).split()), imported


def test_help_imports_neither_numpy_nor_torch():
    status, output, imported = run_cli("--help")
    assert status == 0 and "index" in output
    assert not {"numpy", "torch"} & imported


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["index", str(CMU), "--encoder", "efficientnet-lite0-imagnet"],
            "unknown encoder 'efficientnet-lite0-imagnet'; did you mean "
            "efficientnet-lite0-imagenet or resnet50-imagenet? choose from color-histogram, conch,",
        ),
        (["index", "/no/such/slide.svs"], "/no/such/slide.svs: no such file or folder"),
        (["index", str(CMU), "--weights", "/no/such.pth"], "/no/such.pth: efficientnet"),
    ],
)
def test_index_mistakes_are_refused_before_torch(tmp_path: Path, args: list[str], message: str):
    status, output, imported = run_cli(*args, "--archive", str(tmp_path / "archive"))
    assert status == 1 and message in output and "Traceback" not in output
    assert "torch" not in imported
    assert not (tmp_path / "archive").exists()  # nor an archive begun


def test_search_of_a_missing_archive_is_refused_before_torch(tmp_path: Path):
    status, output, imported = run_cli("search", str(CMU), "--archive", str(tmp_path))
    assert status == 1 and f"{tmp_path}: no archive here" in output
    assert "torch" not in imported


def test_the_names_known_without_torch_are_the_registry_s():
    from histosearch.encoders import list_encoders
    from histosearch.encoders.names import known_names

    assert known_names() == list_encoders()


def test_encoders_reports_the_weights_really_on_disk(tmp_path: Path):
    # an empty Hugging Face cache: resnet50-imagenet's weights are not on this machine
    empty = {"HF_HUB_CACHE": str(tmp_path), "HISTOSEARCH_WEIGHTS": str(tmp_path)}
    status, output, imported = run_cli("encoders", "--json", env=empty)
    assert status == 0 and "torch" not in imported
    rows = {row["name"]: row for row in json.loads(output)}
    assert rows["efficientnet-lite0-imagenet"]["weights_found"] is True
    assert rows["color-histogram"]["weights_found"] is True
    assert rows["resnet50-imagenet"]["weights_found"] is False
    assert str(tmp_path) in rows["resnet50-imagenet"]["looked_up"]
    # and an index with it is refused at once, saying so
    status, output, imported = run_cli(
        "index", str(CMU), "--archive", str(tmp_path / "a"), "--encoder", "resnet50-imagenet",
        env=empty,
    )  # fmt: skip
    assert status == 1 and "resnet50-imagenet: weights are neither given" in output
    assert "torch" not in imported


def test_a_failed_first_index_locks_no_settings(tmp_path: Path):
    archive = tmp_path / "archive"
    common = ["--archive", str(archive), "--encoder", "color-histogram", "--mag", "2.5"]
    failed = runner.invoke(app, ["index", str(WSI / "histolab" / "broken.svs"), *common])
    assert failed.exit_code == 1 and "1 of 1 failed" in failed.output
    # the archive holds no slide: other settings are taken, not refused
    built = runner.invoke(app, ["index", str(CMU), *common, "--tile-size", "112"])
    assert built.exit_code == 0, built.output
    # a readable summary naming the archive's absolute path, no settings JSON
    summary = " ".join(built.output.split())
    assert "added 1 (" in summary and f"archive {archive.resolve()}: 1 slides," in summary
    assert "color-histogram (512-d, pca to 128) on 112 px tiles at 2.5x, otsu tissue" in summary
    # now that it holds one, other settings are refused before the model is built
    status, output, imported = run_cli("index", str(TCGA), *common, "--objective-power", "20")
    assert (
        status == 1
        and "built with other settings; asked for tile_size 224 (archive: 112)" in output
    )
    assert "torch" not in imported


INDEX = [str(CMU), str(TCGA), "--objective-power", "20", "--mag", "5", "--batch-size", "4"]


@pytest.mark.slow  # three index runs: about 35 s on the shared 2 cores
def test_one_ctrl_c_stops_index_cleanly_and_the_resumed_archive_is_the_same(tmp_path: Path):
    from histosearch.bench.resume import snapshot

    reference = tmp_path / "reference"
    built = runner.invoke(app, ["index", *INDEX, "--archive", str(reference)])
    assert built.exit_code == 0, built.output

    archive = tmp_path / "archive"
    command = [sys.executable, "-m", "histosearch.cli", "index", *INDEX, "--archive", str(archive)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    rows = 0
    while process.poll() is None and not rows:  # until the first slide is stored
        try:
            with sqlite3.connect(archive / "catalog.sqlite") as catalog:
                rows = catalog.execute("SELECT COUNT(*) FROM slides").fetchone()[0]
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    assert process.poll() is None, "the index ended before it could be interrupted"
    asked = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    stopped = time.monotonic() - asked
    assert process.returncode == 130, stderr
    assert "interrupted: 1 of 2 stored; run the same command to resume" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    print(f"stopped {stopped:.2f} s after the Ctrl-C")

    resumed = runner.invoke(app, ["index", *INDEX, "--archive", str(archive)])
    assert resumed.exit_code == 0 and "added 1" in resumed.output and "1 already" in resumed.output
    assert snapshot(archive).difference(snapshot(reference)) is None


def test_the_cli_s_spelled_out_choices_are_the_modules():
    # spelled out in cli.common so that `--help` imports neither numpy nor OpenCV
    from typing import get_args

    from histosearch.archive.reduce import REDUCERS
    from histosearch.cli.common import Reduction, SlideReduction, Tissue
    from histosearch.tissue import DETECTORS

    assert set(get_args(Tissue)) == set(DETECTORS)
    assert set(get_args(SlideReduction)) == set(REDUCERS)
    assert set(get_args(Reduction)) == {*REDUCERS, "none"}


def test_command_help_is_one_line_per_paragraph():
    from histosearch.cli import app, bench_app

    for info in (*app.registered_commands, *bench_app.registered_commands):
        assert info.help and all("\n" not in p for p in info.help.split("\n\n")), info.name


def _image_folder(root: Path, per_class: int = 3) -> Path:
    """An ImageFolder layout (root/CLASS/IMAGE) of LC25000 patches, linked, not copied."""
    with (LC / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    for label in sorted({r["label"] for r in rows}):
        (root / label).mkdir(parents=True)
        for row in [r for r in rows if r["label"] == label][:per_class]:
            (root / label / Path(row["path"]).name).symlink_to((LC / row["path"]).resolve())
    return root


def test_class_sub_folders_are_labels_for_index_and_eval(tmp_path: Path):
    from histosearch.archive.archive import Archive
    from histosearch.evaluation.labelled import LabelledSetError, read_labelled_manifest

    folder = _image_folder(tmp_path / "classes")
    archive = tmp_path / "archive"
    built = runner.invoke(
        app, ["index", str(folder), "--archive", str(archive), "--encoder", "color-histogram"]
    )
    assert built.exit_code == 0, built.output
    with Archive.open(archive) as opened:
        labels = {r.name: r.label for r in opened.slides()}
    assert len(labels) == 9 and sorted(set(labels.values())) == ["lung_aca", "lung_n", "lung_scc"]
    assert all(name.startswith(label.replace("_", "")) for name, label in labels.items())
    labelled = read_labelled_manifest(folder)
    assert labelled.labels.count("lung_n") == 3 and len(labelled.paths) == 9
    # a folder has no columns: --column is refused, not ignored
    with pytest.raises(LabelledSetError, match="--column label=tissue: a folder of class"):
        read_labelled_manifest(folder, mapping={"label": "tissue"})
    command = ["index", str(folder), "--archive", str(archive), "--column", "label=tissue"]
    refused = runner.invoke(app, command)
    assert refused.exit_code != 0 and "only manifest CSVs have columns" in str(refused.exception)
    # files beside the class folders: no labels for index, refused by eval
    (folder / "loose.jpeg").symlink_to(labelled.paths[0].resolve())
    with pytest.raises(LabelledSetError, match="not a folder of class sub-folders"):
        read_labelled_manifest(folder)


def test_manifest_rows_give_their_own_magnification(tmp_path: Path):
    # BreakHis' own manifest: a 40X and a 400X image (700x460 PNGs recording no resolution)
    from histosearch.archive.archive import Archive

    breakhis = DATA / "fixtures" / "breakhis-samples-fixture"
    lines = (breakhis / "manifest.csv").read_text().splitlines()
    rows = [lines[0], *(line for line in lines[1:] if "22549AB" in line)]  # 40X, 400X
    manifest = tmp_path / "breakhis.csv"
    manifest.write_text("\n".join(r.replace(r.split(",")[0], str(breakhis / r.split(",")[0]), 1)
                                  if i else r for i, r in enumerate(rows)) + "\n")  # fmt: skip
    archive = tmp_path / "archive"
    args = ["index", str(manifest), "--archive", str(archive), "--encoder", "color-histogram"]
    result = runner.invoke(app, [*args, "--mag", "20", "--tile-size", "112"])
    text = " ".join(result.output.split())
    # 40X read at 20x: 350x230 px, 3x2 tiles; 400X at 20x: 35x23 px, smaller than a tile
    assert result.exit_code == 1 and "added 1 (" in text, text
    assert "the slide is 35x23 px at 20x, smaller than one tile" in text
    with Archive.open(archive) as opened:
        (record,) = opened.slides()
    assert record.name.endswith("-40-001.png") and record.mpp == pytest.approx(0.25)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label,mpp\n{breakhis / rows[1].split(',')[0]},a,fast\n")
    refused = runner.invoke(app, ["index", str(bad), "--archive", str(tmp_path / "b")])
    assert refused.exit_code == 1 and "mpp 'fast' is not a positive number" in refused.output


def readme_python_snippet() -> str:
    """The fenced Python block of the README's "### Python" section, as written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n### Python\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readme_python_snippet_runs_as_written(tmp_path: Path, monkeypatch, capsys):
    # run where ../shared/data is the shared data, as beside the repository
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA.resolve())
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    names: dict[str, object] = {}
    exec(compile(readme_python_snippet(), "README.md", "exec"), names)
    report, archive = names["report"], names["archive"]
    # CMU-1, the TCGA slide and BreakHis' 11 patients (its patient_or_slide_id column)
    assert report.added == 13 and report.failures == []
    patients = {r.patient for r in archive.slides() if r.patient}
    assert len(patients) == 11 and "14-22549AB" in patients
    by_file = names["by_file"]  # pathml's small_HE.svs holds CMU-1's pixels
    assert by_file.slides[0].record.name == "cmu-1-small-region.svs"
    assert by_file.slides[0].similarity > 0.99
    assert len(names["by_region"].query.tiles) == 3 and names["by_region"].slides
    assert len(names["patch"].patches) == 10
    assert (tmp_path / "work" / "matches.geojson").stat().st_size > 100
    assert capsys.readouterr().out.rstrip().endswith("[]")  # archive.check: no problem


def test_verification_counts_the_pairs_that_exist():
    from histosearch.evaluation.metrics import label_pairs, pair_verification

    # 36 items, 3 labels: 630 pairs, 3 x 66 = 198 of them within a label
    labels = [f"class{i % 3}" for i in range(36)]
    similar, dissimilar = label_pairs(labels, 5000)
    assert (len(similar), len(dissimilar)) == (198, 432)
    pairs = {tuple(sorted(p)) for p in [*similar.tolist(), *dissimilar.tolist()]}
    assert len(pairs) == 630  # each once, none with itself
    features = np.random.default_rng(0).normal(size=(36, 8))
    assert pair_verification(features, similar, dissimilar).n_pairs == 630
    # a large set: as many distinct pairs of each kind as asked
    labels = [f"class{i % 3}" for i in range(3000)]
    similar, dissimilar = label_pairs(labels, 500)
    assert len({tuple(p) for p in similar.tolist()}) == len(similar) == 500


BREAKHIS = DATA / "fixtures" / "breakhis-samples-fixture"


def test_index_and_eval_read_breakhis_manifest_alike_with_a_column_mapping(tmp_path, caplog):
    from histosearch.archive.archive import Archive
    from histosearch.evaluation.runner import Evaluation
    from histosearch.evaluation.settings import EvalSettings

    manifest = BREAKHIS / "manifest.csv"

    def evaluation(columns: dict[str, str]) -> Evaluation:
        encoders = (("color-histogram", None),)
        return Evaluation.load(EvalSettings(manifest=manifest, encoders=encoders, columns=columns))

    # unmapped: one warning, naming the mapping that would read it as the patient
    with caplog.at_level("WARNING", logger="histosearch"):
        plain = evaluation({})
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "column patient_or_slide_id is none of histosearch's" in warning
    assert warning.endswith("give --column patient=patient_or_slide_id")
    assert plain.exclude == "none" and plain.data.xy is None  # its x, y columns are empty
    assert plain.data.resolutions[:2] == [(None, 40.0), (None, 400.0)]
    # mapped: no warning, the patients are excluded as neighbours
    caplog.clear()
    with caplog.at_level("WARNING", logger="histosearch"):
        mapped = evaluation({"patient": "patient_or_slide_id"})
    assert not caplog.records and mapped.exclude == "patient"
    assert len(set(mapped.data.column("patient"))) == 11 and len(mapped.data.labels) == 18

    # index: the same warning unmapped; mapped, the option groups the patients
    archive = tmp_path / "archive"
    common = ["--archive", str(archive), "--encoder", "color-histogram", "--group-by", "patient"]
    result = runner.invoke(app, ["index", str(manifest), *common])
    assert result.exit_code == 1 and "no 'patient' column" in result.output
    assert "--column patient=patient_or_slide_id reads patient_or_slide_id as it" in " ".join(
        result.output.split()
    )
    result = runner.invoke(
        app, ["index", str(manifest), *common, "--column", "patient=patient_or_slide_id"]
    )
    assert result.exit_code == 0, result.output
    with Archive.open(archive) as opened:
        records = opened.slides()
    assert len(records) == 11 and {r.patient for r in records} == set(mapped.data.column("patient"))
    # each patch group records its first image's magnification, flagged against the 5x archive
    text = " ".join(result.output.split())
    assert "11 of 11 entries not at 5x (8 at 40x, 2 at 400x, 1 at 100x)" in text


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("labl=diagnosis", "'labl' is none of histosearch's columns (path, label, patient,"),
        ("label", "--column takes NAME=COLUMN, e.g. label=diagnosis"),
        ("label=diagnosis", "--column label=diagnosis: no column 'diagnosis' (path, label,"),
        ("label=patient_or_slide_id", "the manifest has a 'label' column already"),
    ],
)
def test_column_mappings_are_checked_before_torch(tmp_path: Path, option: str, message: str):
    manifest = str(BREAKHIS / "manifest.csv")
    archive = str(tmp_path / "archive")
    status, output, imported = run_cli("index", manifest, "--archive", archive, "--column", option)
    assert status == 1 and message in output and "torch" not in imported
    result = runner.invoke(app, ["eval", manifest, "--column", option, "--out", str(tmp_path)])
    assert result.exit_code != 0 and message in str(result.exception)


def test_the_demo_s_measure_hit_miss_and_scale_flags(lc_cmu: Path, capsys):
    from histosearch.archive.archive import Archive
    from histosearch.cli.archive import _example, _print_archive_accuracy
    from histosearch.evaluation.runner import Evaluation
    from histosearch.evaluation.settings import EvalSettings
    from histosearch.search.searcher import Searcher

    archive_dir = lc_cmu / "archive"
    with Archive.open(archive_dir) as archive:
        settings = archive.settings
        searcher = Searcher(archive)
        groups = [(r.name, r.label) for r in archive.slides() if r.label]
        with (LC / "manifest.csv").open() as file:
            unseen = [  # patches of source tiles not in the archive
                (str(LC / row["path"]), row["label"])
                for row in csv.DictReader(file)
                if row["group"] not in dict(groups)
            ][:40]
        hit, said_hit = _example(searcher, groups, True, 3, "slides")
        miss, said_miss = _example(searcher, unseen, False, 3, "patches", exclude=[])
        for query, said, mode in ((hit, said_hit, "slides"), (miss, said_miss, "patches")):
            result = searcher.search(query, k=3, mode=mode, exclude=[] if miss == query else None)
            right = result.hits[0].record.label == dict(groups + unseen)[query]
            assert said.startswith("a hit:" if right else "a miss:")
    assert said_hit.startswith("a hit:") and said_miss.startswith("a miss:")

    # the table: eval --archive's leave-one-out on the labelled entries (CMU-1 left out)
    _print_archive_accuracy(archive_dir, settings)
    out = " ".join(capsys.readouterr().out.split())
    evaluation = Evaluation.load(
        EvalSettings(archive=archive_dir, slide_column="slide", reduction="pca", n_features=32)
    )
    patch = evaluation.patch_protocol(evaluation.stored)
    assert evaluation.data.unlabelled == ["cmu-1-small-region.svs"]
    slides = evaluation.slide_protocol(evaluation.stored)["slides = slide"]["pca 32-d"]
    assert f"slides, WSI measure (pca 32-d) │ 9 │ {slides['Acc@1']:.1%} │" in out
    assert f"{len(evaluation.data.labels)} │ {patch.metrics['Acc@1']:.1%} │" in out
    assert "the 1 unlabelled entries (cmu-1-small-region.svs) are left out" in out

    # search results flag the patches of unknown scale; the percentile is explained
    query = str(next((LC / "images" / "lung_n").glob("*.jpeg")))
    result = runner.invoke(app, ["search", query, "--archive", str(archive_dir), "-k", "3"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "scale: every result's patches are of unknown scale" in text and "│ unknown" not in text
    # a group against all the others, CMU-1 among them: a column for the mixed scales
    result = runner.invoke(app, ["search", hit, "--archive", str(archive_dir), "-k", "9"])
    text = " ".join(result.output.split())
    assert "│ unknown │" in text and "scale: unknown, the entry's images record none" in text
    assert "Closeness, not diagnosis: a hit of another class can rank high." in text
    assert "typical" not in text
    result = runner.invoke(app, ["search", query, "--archive", str(archive_dir), "--json"])
    rows = json.loads(result.output)["results"]
    assert {row["scale"] for row in rows} <= {"unknown", None} and rows[0]["scale"] == "unknown"


@pytest.mark.slow  # the demo itself: about 30 s on the shared 2 cores
def test_the_demo_ends_with_its_archive_s_measured_accuracy(tmp_path: Path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--groups-per-class", "4"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "a hit: the top result is lung_scc, as the query" in text
    assert "a miss: the query is lung_aca" in text
    assert "Leave-one-out on this archive (histosearch eval --archive)" in text
    assert "12 of 14 entries not at 5x (12 of unknown scale)" in text
    assert text.index("a miss:") < text.index("Leave-one-out") < text.index("browse it:")
