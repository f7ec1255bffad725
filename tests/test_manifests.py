"""Manifests as spreadsheets write them: BOMs, Windows encodings, duplicates, bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_paths import LC

from histosearch.inputs import ManifestError, collect_items, read_manifest, read_manifest_rows

IMAGES = sorted((LC / "images" / "lung_n").glob("*.jpeg"))[:4]


def _write(tmp_path: Path, text: str, encoding: str = "utf-8", name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def _rows(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_utf8_bom_and_windows_encodings_are_read(tmp_path: Path, caplog):
    text = _rows("path,label", f"{IMAGES[0]},bénin", f"{IMAGES[1]},adénocarcinome")
    for encoding in ("utf-8-sig", "utf-16"):
        rows, columns, _ = read_manifest_rows(_write(tmp_path, text, encoding))
        assert columns == ["path", "label"] and rows[0]["label"] == "bénin"
    with caplog.at_level("WARNING", logger="histosearch"):
        rows, _, _ = read_manifest_rows(_write(tmp_path, text, "latin-1"))
    assert [r["label"] for r in rows] == ["bénin", "adénocarcinome"]
    assert "m.csv: not UTF-8, read as cp1252" in caplog.text


def test_semicolon_manifests_are_read(tmp_path: Path):
    rows, columns, _ = read_manifest_rows(_write(tmp_path, _rows("path;label", f"{IMAGES[0]};a")))
    assert columns == ["path", "label"] and rows == [{"path": str(IMAGES[0]), "label": "a"}]


def test_duplicates_are_collapsed_with_a_warning(tmp_path: Path, caplog):
    manifest = _write(
        tmp_path,
        _rows(
            "path,label",
            f"{IMAGES[0]},a",
            f"{IMAGES[1]},a",
            f"{IMAGES[0]},a",
            f"{IMAGES[0].parent}/../lung_n/{IMAGES[0].name},b",
        ),
    )
    with caplog.at_level("WARNING", logger="histosearch"):
        items = read_manifest(manifest, None)
    assert [i.paths[0].name for i in items] == [IMAGES[0].name, IMAGES[1].name]
    assert "2 rows list a file already listed, kept the first: line 4 repeats line 2" in caplog.text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_rows("path,label", f"{IMAGES[0]},a", f"{IMAGES[1]}"), r"line 3: not 2 fields"),
        (
            _rows("path,label,group", f"{IMAGES[0]},a,g", "x", "y,z", f"{IMAGES[1]},a,g"),
            "lines 3, 4: not 3 fields as in the header",
        ),
        (_rows("path,label", f"{IMAGES[0]},a", ",a"), "line 3: no path"),
        (_rows("path,label", f"{IMAGES[0]},a", f"{IMAGES[1]},"), "line 3: no label"),
        (_rows("file,label", f"{IMAGES[0]},a"), r"no 'path' column \(columns: file, label\)"),
        ("", "empty: no header row"),
        (_rows("path,label", "missing-1.png,a", "missing-2.png,a"), "none of the 2 listed"),
    ],
)
def test_bad_rows_are_named_by_line(tmp_path: Path, text: str, reason: str):
    manifest = _write(tmp_path, text)
    with pytest.raises(ManifestError, match=reason) as caught:
        read_manifest(manifest, None)
    assert str(manifest) in str(caught.value)


def test_empty_group_values_are_refused_and_binary_files_named(tmp_path: Path):
    manifest = _write(tmp_path, _rows("path,group", f"{IMAGES[0]},g1", f"{IMAGES[1]},"))
    with pytest.raises(ManifestError, match="line 3: no group"):
        read_manifest(manifest, "group")
    fake = tmp_path / "image.csv"
    fake.write_bytes(IMAGES[0].read_bytes())
    with pytest.raises(ManifestError, match="not a text CSV"):
        read_manifest(fake, None)


def test_a_bad_input_is_recorded_and_the_others_go_on(tmp_path: Path):
    good = _write(tmp_path, _rows("path,label", f"{IMAGES[0]},a"), name="good.csv")
    bad = _write(tmp_path, _rows("path,label", f"{IMAGES[1]}"), name="bad.csv")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    failures: list[tuple[str, str]] = []
    items = collect_items([bad, empty, good], failures=failures)
    assert [i.paths[0] for i in items] == [IMAGES[0]]
    assert [name for name, _ in failures] == ["bad.csv", "empty-folder"]
    assert "a folder without slide or image files" in failures[1][1]
    with pytest.raises(ManifestError):
        collect_items([good, bad])


def test_a_group_mixing_resolutions_is_named(tmp_path: Path, caplog):
    manifest = _write(
        tmp_path,
        _rows(
            "path,patient,magnification",
            f"{IMAGES[0]},p1,40X",
            f"{IMAGES[1]},p1,400X",
            f"{IMAGES[2]},p1,40X",
            f"{IMAGES[3]},p2,40X",
        ),
    )
    with caplog.at_level("WARNING", logger="histosearch"):
        items = read_manifest(manifest, "patient")
    assert [i.objective_power for i in items] == [40, 40]
    assert "group p1 mixes resolutions (40x: 2 rows, 400x: 1 row)" in caplog.text
    assert "group p2" not in caplog.text
