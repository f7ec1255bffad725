"""Cases, not files: slide metadata from manifests and `annotate`, `--where` filters inside both
stages of the search, the consensus of the top k, and case-level search, on a real archive of
both dev sets (tests/cases_data.py) embedded with the colour histogram (seconds, not minutes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import get_args

import h5py
import pytest
from cases_data import write_cases_manifests
from data_paths import IDC
from typer.testing import CliRunner

from histosearch import Archive, ArchiveSettings
from histosearch.cli import app, main
from histosearch.search.searcher import Searcher

runner = CliRunner()
SETTINGS = ArchiveSettings(encoder="color-histogram", magnification=5.0, tile_size=224)
# Filters of every kind: a text value, a number range, a date, a list, a substring, one that
# keeps a single slide (the name is set in the test), and two clauses together.
FILTERS = [
    ["organ = lung"],
    ["organ = breast"],
    ["year >= 2019"],
    ["received < 2016-01-01"],
    ["diagnosis in (lung_aca, 'lung_scc')"],
    ["site ~ idc", "year <= 2020"],
]


@pytest.fixture(scope="module")
def cases_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 LC25000 source tiles per class and 12 IDC patients (IDC and non-IDC patches apart:
    two slides for most patients), 94 slides with organ, site, diagnosis, year, received."""
    root = tmp_path_factory.mktemp("cases")
    manifests = write_cases_manifests(root, lc_groups=24, idc_patients=12)
    with Archive.create(root / "archive", SETTINGS) as archive:
        report = archive.add(manifests, group_by="group")
    # IDC holds a few flat or sliver edge patches: each is left out of its group, named
    assert all("no tissue" in why or "px a patch needs" in why for _, why in report.failures)
    assert report.added == len(archive_slides(root / "archive"))
    return root / "archive"


def archive_slides(root: Path) -> list:
    with Archive.open(root) as archive:
        return archive.slides()


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`histosearch ARGS` as the console runs it: (exit status, stdout, stderr)."""
    import sys

    argv, sys.argv = sys.argv, ["histosearch", *args]
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def test_manifest_columns_become_typed_metadata_in_catalog_and_feature_files(cases_archive):
    with Archive.open(cases_archive) as archive:
        metadata = archive.metadata()
        records = archive.slides()
        # 72 LC25000 source tiles, 22 IDC slides (10 of the 12 patients have both kinds)
        assert len(records) == 94
        assert metadata.kinds == {
            "diagnosis": "text",
            "organ": "text",
            "received": "date",
            "site": "text",
            "year": "number",
        }
        lung = next(r for r in records if r.name == "lung_aca_cluster102")
        values = metadata.of_slide(lung.id)
        assert values["organ"] == "lung" and values["site"] == "LC25000"
        assert values["diagnosis"] == "lung_aca" and int(values["year"]) in range(2012, 2025)
        with h5py.File(cases_archive / lung.feature_file) as h5:
            assert json.loads(h5.attrs["metadata"]) == values
        # a patient's IDC and non-IDC patches are two slides of one case
        breast = [r for r in records if metadata.of_slide(r.id)["organ"] == "breast"]
        assert len({r.patient for r in breast}) == 12 and len(breast) > 12


def test_filtered_two_stage_equals_filtered_exact(cases_archive):
    with Archive.open(cases_archive) as archive:
        searcher = Searcher(archive)
        records = archive.slides()
        metadata = archive.metadata()
        single = ["name = lung_scc_cluster102"]
        assert any(r.name == "lung_scc_cluster102" for r in records)
        for where in [*FILTERS, single]:
            passing = {
                r.id
                for r in records
                if all(_passes(clause, r, metadata.of_slide(r.id)) for clause in where)
            }
            assert passing, where
            compared = 0
            for query in records[::6]:
                kept = passing - {query.id}
                if not kept:
                    continue
                fast = searcher.search(query.id, k=5, where=where, level="slide")
                exact = searcher.search(query.id, k=5, where=where, level="slide", exact=True)
                ids = [h.record.id for h in fast.slides]
                assert ids == [h.record.id for h in exact.slides], (where, query.name)
                assert [h.similarity for h in fast.slides] == pytest.approx(
                    [h.similarity for h in exact.slides], abs=1e-6
                )
                assert set(ids) <= kept and len(ids) == min(5, len(kept))
                compared += 1
            assert compared >= 10


def _passes(clause: str, record, values: dict[str, str]) -> bool:
    """The test's own reading of FILTERS (not the grammar's code)."""
    if clause == "organ = lung":
        return values["organ"] == "lung"
    if clause == "organ = breast":
        return values["organ"] == "breast"
    if clause == "year >= 2019":
        return int(values["year"]) >= 2019
    if clause == "year <= 2020":
        return int(values["year"]) <= 2020
    if clause == "received < 2016-01-01":
        return values["received"] < "2016-01-01"
    if clause.startswith("diagnosis in"):
        return values["diagnosis"] in ("lung_aca", "lung_scc")
    if clause == "site ~ idc":
        return values["site"] == "IDC"
    assert clause.startswith("name = ")
    return record.name == clause.removeprefix("name = ")


def test_patch_search_is_filtered_inside_faiss(cases_archive):
    with Archive.open(cases_archive) as archive:
        searcher = Searcher(archive)
        metadata = archive.metadata()
        query = next(r for r in archive.slides() if r.name == "lung_n_cluster101")
        result = searcher.search(query.id, k=20, mode="patches", where=["organ = breast"])
        assert len(result.patches) == 20  # all 20 from the kept slides, none used up
        assert {metadata.of_slide(h.record.id)["organ"] for h in result.patches} == {"breast"}
        assert result.to_dict()["results"][0]["metadata"]["site"] == "IDC"


def test_case_level_ranks_cases_by_their_best_slide_and_skips_the_query_case(cases_archive):
    with Archive.open(cases_archive) as archive:
        searcher = Searcher(archive)
        query = next(r for r in archive.slides() if r.patient and r.label == "IDC")
        slides = searcher.search(query.id, k=30, level="slide", where=["organ = breast"])
        cases = searcher.search(query.id, k=5, where=["organ = breast"])
        assert cases.level == "case"  # the archive has cases of two slides: the default
        assert all(c.case != query.patient for c in cases.cases)
        ranked = [h for h in slides.slides if h.record.patient != query.patient]
        expected = list(dict.fromkeys(h.record.patient for h in ranked))[:5]
        assert [c.case for c in cases.cases] == expected
        for case in cases.cases:
            own = [h for h in ranked if h.record.patient == case.case]
            assert case.best.record.id == own[0].record.id
            assert case.best.similarity == pytest.approx(own[0].similarity, abs=1e-6)
            assert case.slides in (1, 2) and 1 <= case.matched <= case.slides
        row = cases.to_dict()["results"][0]
        assert row["case"] == cases.cases[0].case and row["case_slides"] >= 1
        # an explicit --exclude slide keeps the query's other slide in
        kept = searcher.search(query.id, k=5, exclude=["slide"], level="case")
        assert query.patient in [c.case for c in kept.cases] or len(kept.cases) == 5


def test_consensus_votes_on_any_column_with_evals_tie_rule(cases_archive):
    with Archive.open(cases_archive) as archive:
        searcher = Searcher(archive)
        query = next(r for r in archive.slides() if r.name == "lung_scc_cluster102")
        result = searcher.search(query.id, k=4, level="slide", vote_on="site")
        consensus = result.consensus
        sites = [archive.metadata().of_slide(h.record.id)["site"] for h in result.slides]
        assert consensus.column == "site" and consensus.k == 4
        assert sum(consensus.votes.values()) == 4 and list(consensus.votes) == list(
            dict.fromkeys(sites)
        )
        assert consensus.agreement == consensus.votes[consensus.majority] / 4
    from histosearch.search.consensus import Consensus

    tie = Consensus.of("label", ["b", "a", "a", "b", None])
    assert tie.majority == "b" and tie.votes == {"b": 2, "a": 2} and tie.agreement == 0.4


def test_consensus_of_leave_one_out_searches_equals_evals_mv(tmp_path: Path):
    """An archive of 150 IDC patches, each a slide of its own (no reduction, so that eval's
    features and the search store hold the same vectors): the majority label of each patch's
    top k, searched with its patient excluded, is right exactly as often as eval reports."""
    with (IDC / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))[:150]
    manifest = tmp_path / "idc.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "patient"])
        writer.writerows([(IDC / r["path"]).resolve(), r["label"], r["patient"]] for r in rows)
    settings = ArchiveSettings(
        encoder="color-histogram", magnification=5.0, tile_size=224, reduction="none"
    )
    with Archive.create(tmp_path / "archive", settings) as archive:
        archive.add([manifest])
    done = runner.invoke(
        app, ["eval", "--archive", str(tmp_path / "archive"), "--out", str(tmp_path / "eval")]
    )
    assert done.exit_code == 0, done.output
    metrics = json.loads(next((tmp_path / "eval").glob("*/metrics.json")).read_text())
    with Archive.open(tmp_path / "archive") as archive:
        searcher = Searcher(archive)
        for k in (1, 3, 5):
            right = []
            for record in archive.slides():
                result = searcher.search(record.id, k=k, exclude=["patient"], mode="patches")
                right.append(result.consensus.majority == record.label)
            assert sum(right) / len(right) == pytest.approx(_mv(metrics, k), abs=1e-9), k


def _mv(metrics: dict, k: int) -> float:
    """MV@k wherever metrics.json keeps it."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == f"MV@{k}" and isinstance(value, float) and "per_class" not in key:
                    found.append(value)
                else:
                    walk(value)

    walk({k: v for k, v in metrics.items() if k != "per_class"})
    assert found, metrics.keys()
    return found[0]


def test_annotate_is_idempotent_and_survives_a_rebuilt_catalog(tmp_path: Path, capsys):
    root = tmp_path / "archive"
    manifests = write_cases_manifests(tmp_path, lc_groups=2, idc_patients=0)
    with Archive.create(root, SETTINGS) as archive:
        archive.add(manifests[:1], group_by="group")
        names = [r.name for r in archive.slides()]
    table = tmp_path / "meta.csv"
    table.write_text(
        "slide,stain,year,report\n"
        + "".join(
            f"{n},H&E,{2000 + i},<script>alert(1)</script> {n}\n" for i, n in enumerate(names)
        )
    )
    code, out, _ = run_main(["annotate", "--archive", str(root), str(table)], capsys)
    assert code == 0 and "6 slides annotated, 6 changed" in out
    assert "year (number)" in out and "stain (text)" in out
    code, out, _ = run_main(["annotate", "--archive", str(root), str(table)], capsys)
    assert code == 0 and "6 slides annotated, 0 changed" in out
    with Archive.open(root) as archive:
        before = {r.name: archive.metadata().of_slide(r.id) for r in archive.slides()}
    assert before[names[1]]["year"] == "2001" and before[names[0]]["organ"] == "lung"
    assert before[names[0]]["report"] == f"<script>alert(1)</script> {names[0]}"
    assert before[names[0]]["stain"] == "H&E"
    # the catalog lost: check --repair rebuilds it from the feature files, metadata and all
    (root / "catalog.sqlite").write_bytes(b"garbage" * 100)
    code, out, err = run_main(["check", "--archive", str(root), "--repair"], capsys)
    assert code == 0, out + err
    with Archive.open(root) as archive:
        after = {r.name: archive.metadata().of_slide(r.id) for r in archive.slides()}
    assert after == before


def test_bad_filters_are_one_line_and_exit_2(cases_archive, capsys):
    base = ["search", "lung_aca_cluster102", "--archive", str(cases_archive)]
    cases = [
        (["--where", "stage = 3"], "no column 'stage'; the archive has name (text), label"),
        (["--where", "organ lung"], "not COLUMN OP VALUE"),
        (["--where", "year >= recent"], "year is a number column, and recent is not a number"),
        (["--where", "organ > 3"], "organ is a text column; > compares number and date"),
        (["--where", "diagnosis in ( )"], "in ( ) of nothing"),
        (["--where", "received >= 2019"], "received is a date column, and 2019 is not a date"),
        (["--vote-on", "stage"], "--vote-on stage: no column 'stage'"),
        (["--show", "stage"], "--show stage: no column 'stage'"),
    ]
    for extra, message in cases:
        code, out, err = run_main([*base, *extra], capsys)
        assert code == 2, (extra, out, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # a clause the archive cannot answer lists the archive's columns with their kinds
    _, _, err = run_main([*base, "--where", "year >= recent"], capsys)
    assert "the archive has name (text), label (text)" in err and "year (number)" in err
    # a filter that keeps nothing says so
    code, _, err = run_main([*base, "--where", "year > 3000"], capsys)
    assert code == 1 and "no slide of the 94 passes --where year > 3000" in err


def test_bad_annotations_name_the_rows_and_change_nothing(cases_archive, tmp_path, capsys):
    with Archive.open(cases_archive) as archive:
        before = archive.catalog.metadata()
    cases = [
        ("slide,stain\nlung_aca_cluster102,HE\nno-such-slide,HE\n", "line 3 (no-such-slide)"),
        ("slide,stain\nlung_aca_cluster102,HE\nlung_aca_cluster102,PAS\n", "line 3 repeats line 2"),
        ("slide,label\nlung_aca_cluster102,x\n", "column label: built-in names"),
        ("stain\nHE\n", "no 'slide' or 'path' column"),
    ]
    for text, message in cases:
        table = tmp_path / "bad.csv"
        table.write_text(text)
        code, _, err = run_main(["annotate", "--archive", str(cases_archive), str(table)], capsys)
        assert code == 1 and message in err and "Traceback" not in err, err
    with Archive.open(cases_archive) as archive:
        assert archive.catalog.metadata() == before


def test_search_prints_metadata_columns_and_the_consensus(cases_archive, capsys):
    code, out, err = run_main(
        [
            "search",
            "10253-IDC",
            "--archive",
            str(cases_archive),
            "--where",
            "organ = breast",
            "--show",
            "year",
            "--level",
            "case",
            "-k",
            "3",
        ],
        capsys,
    )
    assert code == 0, err
    assert "Cases most similar to 10253-IDC" in out and "year" in out
    assert "where organ = breast" in out and "consensus of the top 3: label:" in out
    from histosearch.cli.common import Level
    from histosearch.search.cases import LEVELS

    assert get_args(Level) == LEVELS


def test_api_filters_votes_and_lists_the_columns(cases_archive):
    from fastapi.testclient import TestClient

    from histosearch.server.app import create_app

    with TestClient(create_app(cases_archive)) as client:
        columns = {c["name"]: c for c in client.get("/api/columns").json()}
        assert columns["organ"]["values"] == ["breast", "lung"]
        assert columns["year"]["kind"] == "number" and columns["year"]["min"] == "2012"
        assert columns["received"]["kind"] == "date" and columns["name"]["values"] is None
        slides = client.get("/api/slides?limit=1000").json()["slides"]
        query = next(s for s in slides if s["name"] == "lung_aca_cluster102")
        assert query["metadata"]["organ"] == "lung"
        body = {"slide": query["id"], "k": 3, "where": ["organ = breast"], "vote_on": "site"}
        answer = client.post("/api/search", json=body).json()
        assert answer["where"] == ["organ = breast"] and answer["level"] == "case"
        assert answer["consensus"]["column"] == "site"
        assert answer["consensus"]["votes"] == {"IDC": 3}
        assert all(r["metadata"]["organ"] == "breast" and r["case"] for r in answer["results"])
        bad = client.post("/api/search", json={**body, "where": ["organ > 3"]})
        assert bad.status_code == 400 and "organ is a text column" in bad.json()["detail"]


def test_feedback_export_carries_the_result_metadata(cases_archive, tmp_path):
    from histosearch.archive.feedback import Mark, add_mark, export_csv

    with Archive.open(cases_archive) as archive:
        result = next(r for r in archive.slides() if r.name == "lung_n_cluster101")
        add_mark(archive.catalog, Mark("query.png", "slides", result.id, True))
        export_csv(archive.catalog, tmp_path / "marks.csv")
        year = archive.metadata().of_slide(result.id)["year"]
    with (tmp_path / "marks.csv").open(newline="") as file:
        (row,) = list(csv.DictReader(file))
    assert row["result_name"] == "lung_n_cluster101" and row["result_organ"] == "lung"
    assert row["result_year"] == year and row["result_site"] == "LC25000"
