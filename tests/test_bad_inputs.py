"""The bad-input corpus: files and manifests made broken from the real fixtures, run through
the command line as a user runs it. Each bad input must give one line naming the file and
the reason, a non-zero exit and no traceback, and the good inputs beside it must be done."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bad_files import grey16_tiff, header_bomb_tiff, huge_png
from data_paths import CMU, KIDNEY, LC, TARGET, WSI

from histosearch.cli import main

ROOT = os.geteuid() == 0  # root reads files whatever their permissions
PATCHES = [
    path
    for label in ("lung_aca", "lung_n", "lung_scc")
    for path in sorted((LC / "images" / label).glob("*.jpeg"))[:4]
]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`histosearch ARGS` in-process: (exit status, stdout + stderr)."""
    saved = sys.argv
    sys.argv = ["histosearch", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _cut(source: Path, fraction: float, name: str, tmp: Path) -> Path:
    path = tmp / name
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ---- bad slide and image files: (name, maker, reason) --------------------------------


def _dir(tmp: Path) -> Path:
    (tmp / "folder.svs").mkdir()
    return tmp / "folder.svs"


def _loop(tmp: Path) -> Path:
    (tmp / "loop.svs").symlink_to("loop.svs")
    return tmp / "loop.svs"


def _dangling(tmp: Path) -> Path:
    (tmp / "dangling.svs").symlink_to(tmp / "moved-away.svs")
    return tmp / "dangling.svs"


def _empty(tmp: Path) -> Path:
    (tmp / "empty.svs").touch()
    return tmp / "empty.svs"


def _text_as_svs(tmp: Path) -> Path:
    (tmp / "notes.svs").write_text("scanned on Tuesday; see the lab book\n" * 20)
    return tmp / "notes.svs"


def _garbage_tiff(tmp: Path) -> Path:
    """TIFF magic, then random bytes."""
    rng = np.random.default_rng(0)
    (tmp / "garbage.tif").write_bytes(b"II*\x00" + rng.bytes(5000))
    return tmp / "garbage.tif"


def _unreadable(tmp: Path) -> Path:
    path = tmp / "locked.svs"
    shutil.copy(CMU, path)
    path.chmod(0)
    return path


@dataclass
class Bad:
    name: str
    make: Callable[[Path], Path]
    reason: str  # a regular expression the one-line message must match


SLIDES = [
    Bad("truncated SVS (half)", lambda t: _cut(CMU, 0.5, "half.svs", t), "truncated: the file has"),
    Bad(
        "truncated SVS (90%)",
        lambda t: _cut(CMU, 0.9, "most.svs", t),
        "truncated: .* image directory 2 is at byte",
    ),
    Bad("truncated plain TIFF", lambda t: _cut(KIDNEY, 0.6, "kidney.tif", t), "truncated"),
    Bad("truncated PNG", lambda t: _cut(TARGET, 0.5, "target.png", t), "truncated"),
    Bad("truncated JPEG", lambda t: _cut(PATCHES[0], 0.5, "patch.jpeg", t), "truncated"),
    Bad("zero-byte file", _empty, "the file is empty"),
    Bad("directory named .svs", _dir, "is a directory, not a slide file"),
    Bad("symbolic link loop", _loop, "symbolic link loop"),
    Bad("dangling symbolic link", _dangling, "broken symbolic link to"),
    Bad("missing file", lambda t: t / "never-written.svs", "no such file"),
    Bad("text named .svs", _text_as_svs, "not a format OpenSlide reads"),
    Bad("TIFF magic then garbage", _garbage_tiff, "corrupt TIFF: the file has 5,004 bytes"),
    Bad("header bomb TIFF", header_bomb_tiff, "claims 200000x200000 px in 611,524 tiles"),
    Bad("header bomb PNG", huge_png, "refused before decoding, too large"),
    Bad("tiled 16-bit grayscale TIFF", grey16_tiff, "not a brightfield RGB image"),
    Bad(
        "multiplex fluorescence QPTIFF",
        lambda t: WSI / "pathml" / "small_vectra.qptiff",
        "not a brightfield RGB image",
    ),
    Bad("corrupt SVS fixture", lambda t: WSI / "histolab" / "broken.svs", "corrupt or unsupported"),
    Bad(
        "unknown TIFF compression",
        lambda t: WSI / "openslide-python" / "unopenable.tiff",
        "Unsupported TIFF compression",
    ),
    Bad(
        "truncated DICOM WSI",
        lambda t: _cut(WSI / "pathml" / "small_dicom.dcm", 0.1, "small.dcm", t),
        "truncated or corrupt DICOM",
    ),
]
if not ROOT:
    SLIDES.append(Bad("permission denied", _unreadable, "permission denied"))


def _good_slides(tmp: Path) -> list[Path]:
    """A real slide, and real images behind a wrong extension (read by their content)."""
    jpeg_as_svs, png_as_tif = tmp / "patch-named.svs", tmp / "target-named.tif"
    shutil.copy(PATCHES[1], jpeg_as_svs)
    shutil.copy(TARGET, png_as_tif)
    return [CMU, jpeg_as_svs, png_as_tif]


def _made(tmp: Path, corpus: list[Bad]) -> list[tuple[Bad, Path]]:
    folder = tmp / "bad"
    folder.mkdir()
    return [(bad, bad.make(folder)) for bad in corpus]


def _assert_one_line_each(output: str, made: list[tuple[Bad, Path]]) -> None:
    assert "Traceback" not in output, output
    for bad, path in made:
        lines = [line for line in output.splitlines() if f"{path}:" in line]
        assert len(lines) == 1, (bad.name, output)
        assert re.search(bad.reason, lines[0]), (bad.name, lines[0])


def test_tile_names_each_bad_file_and_tiles_the_good_ones(tmp_path: Path, capsys):
    made = _made(tmp_path, SLIDES)
    good = _good_slides(tmp_path)[::2]  # the 224 px patch is smaller than a tile at 5x
    out = tmp_path / "tiles"
    code, output = run(
        ["tile", *[p for _, p in made], *good, "--mag", "5", "--mpp", "0.5", "--out", out],
        capsys,
    )
    assert code == 1 and f"{len(made)} of {len(made) + len(good)} failed" in output
    _assert_one_line_each(output, made)
    assert sorted(p.name for p in out.glob("*.csv")) == sorted(f"{p.name}.tiles.csv" for p in good)


def test_index_names_each_bad_file_and_stores_the_good_ones(tmp_path: Path, capsys):
    from histosearch.archive.archive import Archive

    made = _made(tmp_path, [b for b in SLIDES if b.name != "directory named .svs"])
    good = _good_slides(tmp_path)
    archive = tmp_path / "archive"
    code, output = run(
        [
            "index",
            *[p for _, p in made],
            *good,
            "--archive",
            archive,
            "--encoder",
            "color-histogram",
            "--reduction",
            "none",
            "--mpp",
            "0.5",
        ],
        capsys,
    )
    assert code == 1 and f"{len(made)} of {len(made) + len(good)} failed" in output
    _assert_one_line_each(output, made)
    with Archive(archive) as stored:
        assert sorted(r.name for r in stored.slides()) == sorted(p.name for p in good)


def test_search_with_a_bad_query_file(tmp_path: Path, capsys):
    manifest = _manifest(tmp_path, "good.csv", ["path,label,group"], PATCHES, "{p},{label},{g}")
    archive = tmp_path / "archive"
    code, output = run(
        ["index", manifest, "--archive", archive, "--encoder", "color-histogram"], capsys
    )
    assert code == 0, output
    queries = _made(
        tmp_path,
        [b for b in SLIDES if b.name in QUERY_KINDS],
    )
    for bad, path in queries:
        code, output = run(["search", path, "--archive", archive], capsys)
        assert code == 1, (bad.name, output)
        _assert_one_line_each(output, [(bad, path)])


def _image(name: str, mode: str, size: int, colour) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        from PIL import Image

        Image.new(mode, (size, size), colour).save(tmp / name)
        return tmp / name

    return make


# Images that decode but hold nothing to search by (thresholds: tissue.MIN_PATCH_SIDE, the
# contrast MIN_CONTRAST), as patches and as queries.
DEGENERATE = [
    Bad("1x1 PNG", _image("dot.png", "RGB", 1, "red"), r"1x1 px, under the 16 px"),
    Bad(
        "8x8 black TIFF",
        _image("black.tif", "RGB", 8, "black"),
        r"slide is 2x2 px at 5x, smaller than one tile",
    ),
    Bad("white PNG", _image("white.png", "RGB", 224, "white"), r"no tissue: .* flat colour"),
    Bad("transparent PNG", _image("clear.png", "RGBA", 224, (0, 0, 0, 0)), r"no tissue: .*flat"),
    Bad("flat CMYK JPEG", _image("cmyk.jpg", "CMYK", 400, (0, 0, 0, 0)), r"no tissue: .*flat"),
]


def test_degenerate_images_are_refused_as_patches_and_as_queries(tmp_path: Path, capsys):
    made = _made(tmp_path, DEGENERATE)
    archive = tmp_path / "archive"
    index = ["index", *[p for _, p in made], *PATCHES[:3], "--archive", archive]
    code, output = run([*index, "--encoder", "color-histogram", "--mpp", "0.5"], capsys)
    assert code == 1 and f"{len(made)} of {len(made) + 3} failed" in output, output
    _assert_one_line_each(output, made)
    for bad, path in made:
        code, output = run(["search", path, "--archive", archive, "--mpp", "0.5"], capsys)
        assert code == 1, (bad.name, output)
        _assert_one_line_each(output, [(bad, path)])


QUERY_KINDS = {
    "truncated JPEG",
    "zero-byte file",
    "directory named .svs",
    "symbolic link loop",
    "header bomb TIFF",
    "header bomb PNG",
    "tiled 16-bit grayscale TIFF",
}


# ---- bad manifests ---------------------------------------------------------------------


def _manifest(
    tmp: Path,
    name: str,
    header: list[str],
    paths: list[Path],
    row: str,
    encoding: str = "utf-8",
    extra: list[str] = (),
) -> Path:
    lines = list(header)
    for index, path in enumerate(paths):
        label = path.parent.name
        lines.append(row.format(p=path, label=label, g=f"{label}-{index % 2}"))
    path = tmp / name
    path.write_bytes(("\n".join([*lines, *extra]) + "\n").encode(encoding))
    return path


def _truncated_in_manifest(tmp: Path) -> tuple[Path, Path]:
    bad = _cut(PATCHES[2], 0.5, "cut-" + PATCHES[2].name, tmp)
    paths = [bad if p == PATCHES[2] else p for p in PATCHES]
    return _manifest(tmp, "one-truncated.csv", ["path,label"], paths, "{p},{label}"), bad


# (name, maker of the manifest, reason of the one message or None when it is read whole)
MANIFESTS: list[tuple[str, Callable[[Path], Path], str | None]] = [
    (
        "UTF-8 with BOM",
        lambda t: _manifest(t, "bom.csv", ["path,label"], PATCHES, "{p},{label}", "utf-8-sig"),
        None,
    ),
    (
        "Latin-1",
        lambda t: _manifest(t, "latin1.csv", ["path,label"], PATCHES, "{p},{label}é", "latin-1"),
        None,
    ),
    (
        "duplicate rows",
        lambda t: _manifest(t, "dups.csv", ["path,label"], PATCHES + PATCHES[:3], "{p},{label}"),
        None,
    ),
    (
        "short rows",
        lambda t: _manifest(
            t, "short.csv", ["path,label,group"], PATCHES, "{p},{label},{g}", extra=["x,y"]
        ),
        r"line 14: not 3 fields as in the header",
    ),
    (
        "empty label",
        lambda t: _manifest(t, "nolabel.csv", ["path,label"], PATCHES, "{p},", extra=[]),
        "line 2: no label",
    ),
    (
        "row without path",
        lambda t: _manifest(t, "nopath.csv", ["path,label"], PATCHES, "{p},{label}", extra=[",x"]),
        "line 14: no path",
    ),
    (
        "no path column",
        lambda t: _manifest(t, "nocol.csv", ["file,label"], PATCHES, "{p},{label}"),
        r"no 'path' column \(columns: file, label\)",
    ),
    (
        "none of the files exist",
        lambda t: _manifest(
            t, "gone.csv", ["path,label"], [t / f"gone-{i}.png" for i in range(3)], "{p},x"
        ),
        "none of the 3 listed files exists",
    ),
    ("zero-byte manifest", lambda t: (t / "empty.csv").write_text("") or t / "empty.csv", "empty"),
    (
        "image named .csv",
        lambda t: shutil.copy(PATCHES[0], t / "image.csv") and t / "image.csv",
        "not a text CSV file",
    ),
    ("missing manifest", lambda t: t / "never.csv", "no such manifest"),
    (
        "directory named .csv",
        lambda t: (t / "folder.csv").mkdir() or t / "folder.csv",
        "is a directory, not a manifest CSV",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_index_of_a_manifest(tmp_path: Path, capsys, name: str, make, reason: str | None):
    from histosearch.archive.archive import Archive

    manifest = make(tmp_path)
    archive = tmp_path / "archive"
    args = ["index", manifest, "--archive", archive, "--encoder", "color-histogram"]
    code, output = run([*args, "--workers", "0"], capsys)
    assert "Traceback" not in output, output
    if reason is None:
        assert code == 0, output
        with Archive(archive) as stored:
            assert len(stored.slides()) == len(PATCHES)
        if name != "UTF-8 with BOM":
            assert f"warning: {manifest}:" in output  # read as cp1252 / duplicates dropped
        return
    assert code == 1
    lines = [line for line in output.splitlines() if f"{manifest}:" in line]
    assert len(lines) == 1 and re.search(reason, lines[0]), output


def test_index_of_a_manifest_with_missing_and_truncated_files(tmp_path: Path, capsys):
    from histosearch.archive.archive import Archive

    manifest, bad = _truncated_in_manifest(tmp_path)
    gone = tmp_path / "gone.jpeg"
    with manifest.open("a") as file:
        file.write(f"{gone},lung_n\n")
    archive = tmp_path / "archive"
    code, output = run(
        ["index", manifest, "--archive", archive, "--encoder", "color-histogram"], capsys
    )
    assert code == 1 and "Traceback" not in output
    assert (
        len(
            [line for line in output.splitlines() if f"{bad}: cannot read image: truncated" in line]
        )
        == 1
    )
    assert len([line for line in output.splitlines() if f"{gone}: no such file" in line]) == 1
    with Archive(archive) as stored:
        assert len(stored.slides()) == len(PATCHES) - 1


@pytest.mark.parametrize(
    ("name", "reason"),
    [("short rows", "line 14: not 3 fields"), ("empty label", "line 2: no label")],
)
def test_eval_and_train_refuse_bad_manifests_by_line(tmp_path: Path, capsys, name, reason):
    make = next(m[1] for m in MANIFESTS if m[0] == name)
    manifest = make(tmp_path)
    for args in (
        ["eval", manifest, "--encoder", "color-histogram", "--out", tmp_path / "eval"],
        ["train", "lgffem", "--data", manifest, "--out", tmp_path / "run"],
    ):
        code, output = run(args, capsys)
        assert code == 1 and "Traceback" not in output, output
        lines = [line for line in output.splitlines() if f"{manifest}:" in line]
        assert len(lines) == 1 and re.search(reason, lines[0]), output


def test_eval_names_a_truncated_patch(tmp_path: Path, capsys):
    manifest, bad = _truncated_in_manifest(tmp_path)
    code, output = run(
        ["eval", manifest, "--encoder", "color-histogram", "--out", tmp_path / "eval"], capsys
    )
    assert code == 1 and "Traceback" not in output, output
    assert f"{bad}: cannot read image: truncated" in output


@pytest.mark.slow
def test_train_leaves_out_a_truncated_image_and_says_so(tmp_path: Path, capsys):
    manifest, bad = _truncated_in_manifest(tmp_path)
    code, output = run(
        [
            "train",
            "byol",
            "--data",
            manifest,
            "--out",
            tmp_path / "run",
            "--backbone",
            "resnet10t",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 1 and "Traceback" not in output, output
    assert "1 images left out" in output and f"{bad}: cannot read image: truncated" in output
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
